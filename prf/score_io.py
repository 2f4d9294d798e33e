"""SCORES on disk (docs/scores-format.md): schema, provenance, resumable part files, the atomic merge, the
keep / reject lists and the summary.

Streaming and resuming: while scoring, finished rows go to ``<out>.parts/part-NNNNNN.parquet`` (each written
atomically) next to ``<out>.parts/run.json`` (the provenance). A rerun with the same ``--out`` reads the
image ids already there (and in an existing ``<out>``), refuses if the thresholds or checkpoints differ,
and scores only the rest. At the end every source (an existing ``<out>`` first, then the parts in order) is
streamed into a hidden temporary file, de-duplicated by ``image_id`` and put in input order (``merge``),
renamed over ``<out>`` (atomic), and only then are the parts removed (``run.json`` last). A kill at any
point leaves either the parts or a complete ``<out>`` (or both): rerunning finishes the job and each image
is in the table exactly once.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prf.data.io import atomic_write_bytes, atomic_write_json
from prf.thresholds import METRICS, ThresholdsConfig, parse_thresholds

SCORES_FORMAT = "prf-scores"
SCORES_FORMAT_VERSION = 1
METADATA_KEY = b"prf_scores"
MERGE_ROWS = 4096  # rows per row group of the merged file
FLUSH_SECONDS = 30.0  # a scoring process writes its buffered rows at least this often


class ScoresMismatchError(ValueError):
    """An existing output was made with other thresholds, checkpoints or input: refusing to mix them."""


def prf_version() -> str:
    try:
        return importlib.metadata.version("prf-animals")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def scores_schema(model_names: Sequence[str]) -> pa.Schema:
    """The SCORES columns for these models (docs/scores-format.md), in order."""
    fields: list[tuple[str, pa.DataType]] = [
        ("image_id", pa.string()),
        ("image", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("keep", pa.bool_()),
    ]
    for name in model_names:
        fields += [(f"{name}_{metric}", pa.float64()) for metric in METRICS]
        fields.append((f"{name}_keep", pa.bool_()))
    fields += [("mask_area", pa.float64()), ("source_index", pa.int64())]
    fields += [(f"{name}_keypoints_2d", pa.list_(pa.float32())) for name in model_names]
    fields.append(("keypoints_2d", pa.list_(pa.float32())))
    fields += [(f"{name}_keypoint_errors", pa.list_(pa.float32())) for name in model_names]
    fields += [(f"{name}_keypoint_flip_gaps", pa.list_(pa.float32())) for name in model_names]
    return pa.schema(fields)


def comparable(provenance: dict[str, Any]) -> dict[str, Any]:
    """What must agree for two runs to share one output: input, thresholds hash, models and their sha256."""
    return {
        "input": provenance.get("input"),
        "thresholds_sha256": (provenance.get("thresholds") or {}).get("sha256"),
        "models": [[m.get("name"), m.get("sha256")] for m in provenance.get("models") or []],
    }


def _short(models: list[list[Any]]) -> str:
    return ", ".join(f"{name} {str(sha)[:12]}" for name, sha in models)


def check_compatible(old: dict[str, Any], new: dict[str, Any], where: Path) -> None:
    """Raise ScoresMismatchError naming what differs between ``where``'s provenance and this run's."""
    before, now = comparable(old), comparable(new)
    differences = []
    if before["input"] != now["input"]:
        differences.append(f"input {before['input']} there, {now['input']} now")
    if before["thresholds_sha256"] != now["thresholds_sha256"]:
        differences.append(
            f"thresholds file sha256 {str(before['thresholds_sha256'])[:12]} there, "
            f"{str(now['thresholds_sha256'])[:12]} now"
        )
    if before["models"] != now["models"]:
        differences.append(
            f"checkpoints (model sha256) {_short(before['models'])} there, {_short(now['models'])} now"
        )
    if differences:
        raise ScoresMismatchError(
            f"{where} was scored with other settings; refusing to mix them in one table: "
            + "; ".join(differences)
            + ". Use another --out, or delete it to start again"
        )


def read_provenance(path: Path, hint: str = "is it a SCORES file from prf score?") -> dict[str, Any]:
    """The provenance stored in a SCORES file's metadata (ValueError if it is not a SCORES file; ``hint``
    ends the message when it is not Parquet at all)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path} is not a readable Parquet file ({err}); {hint}") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} exists but is not a PRF SCORES file (no {METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[METADATA_KEY])


def read_thresholds_of(provenance: dict[str, Any]) -> ThresholdsConfig:
    """The thresholds a SCORES file was made with (from its provenance)."""
    return parse_thresholds(
        provenance["thresholds"]["content"], "thresholds stored in the SCORES file"
    ).config


def image_ids(path: Path) -> set[str]:
    return set(pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist())


class PartStore:
    """The ``<out>.parts`` folder of a run in progress (module docstring)."""

    def __init__(self, out: Path, rank: int | None = None) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.run_file = self.dir / "run.json"
        self.rank = rank
        self.prefix = "part-" if rank is None else f"part-r{rank:05d}-"

    def part_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("part-*.parquet") if not p.name.startswith("."))

    def provenance(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        return json.loads(self.run_file.read_text(encoding="utf-8"))

    def start(self, provenance: dict[str, Any]) -> None:
        """Create the folder and run.json, or check an existing run.json against this run."""
        old = self.provenance()
        if old is not None:
            check_compatible(old, provenance, self.dir)
        elif self.part_files():
            raise ScoresMismatchError(
                f"{self.dir} holds parts but no run.json; delete the folder to start again"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f".{self.prefix}*.tmp"):  # this writer's own leftovers of a kill
            stale.unlink(missing_ok=True)
        if self.rank in (None, 0):  # the merging process: a merge killed before its rename
            self.out.with_name(f".{self.out.name}.merge.tmp").unlink(missing_ok=True)
            for stale in self.dir.glob(".run.json.*.tmp"):
                stale.unlink(missing_ok=True)
        if old is None and self.rank in (None, 0):
            # one writer: rank 0 clears other writers' half-written run.json above, so a rank > 0 writing
            # its own copy at the same time could lose its temporary file mid-rename
            atomic_write_json(self.run_file, provenance)

    def write(self, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
        """Write rows as this writer's next part file (``part-NNNNNN``; a rank's: ``part-rRRRRR-NNNNNN``),
        atomically: a kill leaves either the whole part or a hidden ``.part-*.tmp`` that is never read."""
        own = [p for p in self.part_files() if p.name.startswith(self.prefix) and _number(p, self.prefix)]
        number = int(_number(own[-1], self.prefix)) + 1 if own else 0
        path = self.dir / f"{self.prefix}{number:06d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return path

    def cleanup(self) -> None:
        """Remove the parts, then run.json, then the folder (after a successful merge)."""
        for part in self.part_files():
            part.unlink(missing_ok=True)
        self.run_file.unlink(missing_ok=True)
        for stale in self.dir.glob(".*"):
            stale.unlink(missing_ok=True)
        if self.dir.is_dir():
            self.dir.rmdir()


class PartWriter:
    """Buffers one writer's scored rows and writes them to its ``PartStore`` as a part file every
    ``flush_rows`` rows or ``FLUSH_SECONDS``, and on ``flush()``; ``on_write(n)`` is told each time n rows
    are safely on disk. Every scoring driver (one process, several, Lightning ranks) streams through one."""

    def __init__(
        self,
        store: PartStore,
        schema: pa.Schema,
        flush_rows: int,
        on_write: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.store, self.schema, self.flush_rows, self.on_write = store, schema, flush_rows, on_write
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def extend(self, rows: list[dict[str, Any]]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.flush_rows or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (finished rows are complete: callers flush on the way out too)."""
        if self.buffer:
            self.store.write(self.buffer, self.schema)
            self.on_write(len(self.buffer))
        self.buffer, self.last_flush = [], time.monotonic()


def _number(path: Path, prefix: str) -> str:
    """The NNNNNN of ``<prefix>NNNNNN.parquet`` ("" when the rest of the name is not a number)."""
    rest = path.name[len(prefix) :].removesuffix(".parquet")
    return rest if rest.isdigit() else ""


def merge(
    out: Path,
    sources: Sequence[Path],
    schema: pa.Schema,
    provenance: dict[str, Any],
    by_image_id: bool = False,
) -> int:
    """Merge ``sources`` into ``out`` atomically, in input order; returns the rows written.

    ``by_image_id`` (a BATCH input, whose order is its sorted image ids): order the rows by ``image_id``
    and renumber ``source_index`` by the merged order. A BATCH scored while it was still being made (by
    shards) listed only the images finished by then, so the positions recorded in earlier runs' rows are
    not those of the finished batch.

    Each ``image_id`` is written once: its first occurrence in ``sources`` order wins (a padding
    sampler's duplicate, or parts left by a kill between the rename and the cleanup). Rows are ordered
    by ``source_index``, ties in ``sources`` order, so the table does not depend on how many processes
    scored it or how often the run was resumed.

    Two streaming passes (``_MergeIndex``): the first reads only ``image_id`` and ``source_index`` and
    works out the order; the second reads each row group of a source once and writes the rows in that
    order, holding only the row groups it is part way through. Part files are sorted by ``source_index``
    (every writer scores its images in input order), so that is a few row groups per writer; a source
    that is not sorted (an ``out`` written by an older version) is held until its rows are all written.
    Memory: ~16 bytes per row for the order, plus the set of image ids (as any de-duplication needs).
    """
    metadata = {METADATA_KEY: json.dumps(provenance).encode("utf-8")}
    tmp = out.with_name(f".{out.name}.merge.tmp")
    index = _MergeIndex(sources, by_image_id)
    order = index.order()
    renumbered = schema.get_field_index("source_index") if by_image_id else -1
    loaded: dict[int, pa.Table] = {}
    remaining = np.bincount(index.unit[order], minlength=len(index.units))  # rows still to write, per group
    try:
        with pq.ParquetWriter(tmp, schema.with_metadata(metadata)) as writer:
            for start in range(0, len(order), MERGE_ROWS):
                chosen = order[start : start + MERGE_ROWS]
                units, rows = index.unit[chosen], index.row[chosen]
                by_unit = np.argsort(units, kind="stable")  # the chunk's rows grouped by row group
                pieces = []
                for unit, block in _runs(units[by_unit], by_unit):
                    if unit not in loaded:
                        loaded[unit] = index.read_unit(unit, schema)
                    pieces.append(loaded[unit].take(pa.array(rows[block])))
                    remaining[unit] -= len(block)
                    if remaining[unit] == 0:
                        del loaded[unit]
                grouped = pa.concat_tables(pieces)
                # row k of ``grouped`` is row by_unit[k] of the chunk: put every row back in its place
                chunk = grouped.take(pa.array(np.argsort(by_unit)))
                if renumbered >= 0:
                    positions = pa.array(np.arange(start, start + len(chosen), dtype=np.int64))
                    chunk = chunk.set_column(renumbered, schema.field(renumbered), positions)
                writer.write_table(chunk, row_group_size=MERGE_ROWS)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(order)


def _runs(sorted_units: np.ndarray, positions: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    """(unit, positions) for each run of equal values in ``sorted_units`` (positions aligned with it)."""
    starts = np.flatnonzero(np.diff(sorted_units, prepend=-1))
    ends = np.append(starts[1:], len(sorted_units))
    for begin, end in zip(starts, ends, strict=True):
        yield int(sorted_units[begin]), positions[begin:end]


class _MergeIndex:
    """Where every row to merge is (``merge``'s first pass): per kept row its ``source_index`` (``key``;
    its ``image_id`` with ``by_image_id``),
    its row group (``unit``: an index into ``units``, the (source, row group) pairs in ``sources``
    order) and its row in that group (``row``). Rows whose ``image_id`` came earlier are left out."""

    def __init__(self, sources: Sequence[Path], by_image_id: bool = False) -> None:
        self.units: list[tuple[Path, int]] = []
        seen: set[str] = set()
        keys, units, rows = [], [], []
        for source in sources:
            with pq.ParquetFile(source) as parquet:
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group, columns=["image_id", "source_index"])
                    image_ids = table.column("image_id").to_pylist()
                    kept = self._first_occurrences(image_ids, seen)
                    if by_image_id:
                        keys.append(np.array(image_ids, dtype=object)[kept])
                    else:  # a row without a position (never written by prf) goes after every positioned row
                        position = table.column("source_index").fill_null(np.iinfo(np.int64).max)
                        keys.append(position.to_numpy()[kept])
                    units.append(np.full(len(kept), len(self.units), dtype=np.int32))
                    rows.append(kept.astype(np.int32))
                    self.units.append((source, group))
        empty = np.zeros(0, dtype=np.int64)
        self.key = np.concatenate(keys) if keys else empty
        self.unit = np.concatenate(units) if units else empty.astype(np.int32)
        self.row = np.concatenate(rows) if rows else empty.astype(np.int32)

    @staticmethod
    def _first_occurrences(image_ids: list[str], seen: set[str]) -> np.ndarray:
        """Positions of the ids not in ``seen`` (nor earlier in ``image_ids``); adds them to ``seen``."""
        fresh = []
        for image_id in image_ids:
            fresh.append(image_id not in seen)
            seen.add(image_id)
        return np.flatnonzero(fresh)

    def order(self) -> np.ndarray:
        """Positions into ``key`` / ``unit`` / ``row`` in output order (by ``source_index``, stable: ties
        keep ``sources`` order)."""
        return np.argsort(self.key, kind="stable")

    def read_unit(self, unit: int, schema: pa.Schema) -> pa.Table:
        """One row group in ``schema``: a column that the file lacks (one an older prf did not write, such
        as ``<M>_keypoint_errors``; every column added since is nullable) is filled with nulls."""
        source, group = self.units[unit]
        with pq.ParquetFile(source) as parquet:
            table = parquet.read_row_group(group)
        for column in schema:
            if column.name not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, column.type))
        return table.select(schema.names).cast(schema)


def _iter_columns(path: Path, columns: list[str]) -> Iterable[dict[str, list[Any]]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=MERGE_ROWS, columns=columns):
        yield batch.to_pydict()


def write_lists(out: Path) -> tuple[Path, Path]:
    """``keep.txt`` and ``reject.txt`` beside ``out``: one image path per line (errors are rejects; a row
    with no image path, an Animal3D entry without ``img_path``, has no line: it is in SCORES only)."""
    keep_path, reject_path = out.with_name("keep.txt"), out.with_name("reject.txt")
    keep_tmp, reject_tmp = out.with_name(".keep.txt.tmp"), out.with_name(".reject.txt.tmp")
    with keep_tmp.open("w", encoding="utf-8") as keep, reject_tmp.open("w", encoding="utf-8") as reject:
        for chunk in _iter_columns(out, ["image", "keep"]):
            for image, kept in zip(chunk["image"], chunk["keep"], strict=True):
                if image:
                    (keep if kept else reject).write(f"{image}\n")
    os.replace(keep_tmp, keep_path)
    os.replace(reject_tmp, reject_path)
    return keep_path, reject_path


def agreement_label(kept: Sequence[str], names: Sequence[str]) -> str:
    """'both keep' / 'only A keeps' / 'neither keeps' for two models; 'all keep' / 'only A+C keep' /
    'none keep' otherwise."""
    if len(kept) == len(names):
        return "both keep" if len(names) == 2 else "all keep"
    if not kept:
        return "neither keeps" if len(names) == 2 else "none keep"
    return "only " + "+".join(kept) + (" keeps" if len(kept) == 1 else " keep")


@dataclass
class ScoreSummary:
    """Counts over a whole SCORES file, plus what this run did.

    ``failures[model][metric]``: scored (status ok) images failing that threshold; ``agreement``: scored
    images per pattern of per-model verdicts (``agreement_label``); ``errors``: (image_id, reason) of the
    first error rows.
    """

    out: Path
    models: list[str]
    combine: str
    total: int = 0
    kept: int = 0
    rejected: int = 0
    errored: int = 0
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    limits: dict[str, dict[str, str]] = field(default_factory=dict)
    agreement: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    scored_now: int = 0
    skipped: int = 0
    seconds: float = 0.0
    keep_list: Path | None = None
    reject_list: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "total": self.total,
            "kept": self.kept,
            "rejected": self.rejected,
            "errors": self.errored,
            "failures": self.failures,
            "agreement": self.agreement,
            "scored_now": self.scored_now,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }

    def renderable(self) -> Any:
        """A rich Group of tables: verdicts, reject reasons by model and threshold, agreement, errors."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        main = Table(title=f"prf score: {self.out}", show_header=False)
        main.add_row("images", str(self.total))
        main.add_row("kept", f"{self.kept} ({_share(self.kept, self.total)})")
        main.add_row("rejected", f"{self.rejected} ({_share(self.rejected, self.total)})")
        main.add_row("errors", f"{self.errored} ({_share(self.errored, self.total)})")
        speed = (
            f", {self.scored_now / self.seconds:.1f} images/s" if self.seconds > 0 and self.scored_now else ""
        )
        main.add_row("this run", f"scored {self.scored_now}, already done {self.skipped}{speed}")
        reasons = Table(
            title=f"reject reasons (scored images failing each threshold; combine: {self.combine})"
        )
        for column in ("model", "metric", "threshold", "images failing"):
            reasons.add_column(column)
        for name in self.models:
            for metric, count in self.failures.get(name, {}).items():
                reasons.add_row(name, metric, self.limits[name][metric], str(count))
        rule = "kept only when every model keeps it" if self.combine == "all" else "kept when one does"
        agree = Table(title=f"per-model agreement (scored images; an image is {rule})")
        agree.add_column("verdicts")
        agree.add_column("images")
        for label, count in self.agreement.items():
            agree.add_row(label, str(count))
        parts: list[Any] = [main, reasons, agree]
        if self.errors:
            errors = Table(title=f"errors (first {len(self.errors)} of {self.errored})")
            errors.add_column("image_id")
            errors.add_column("reason", overflow="fold")
            for image_id, reason in self.errors:  # Text: a path in a reason may look like a Rich tag
                errors.add_row(Text(image_id), Text(reason))
            parts.append(errors)
        return Group(*parts)


def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "-"


def _ordered_labels(names: Sequence[str]) -> list[str]:
    labels = [agreement_label(list(names), names)]
    labels += [agreement_label([name], names) for name in names] if len(names) == 2 else []
    labels.append(agreement_label([], names))
    return labels


def summarize(out: Path, max_errors: int = 5) -> ScoreSummary:
    """Stream over a SCORES file and count verdicts, threshold failures and agreement."""
    provenance = read_provenance(out)
    config = read_thresholds_of(provenance)
    names = config.model_names()
    summary = ScoreSummary(out=out, models=names, combine=config.combine)
    checks = {name: config.models[name].checks() for name in names}
    summary.failures = {name: {c.metric: 0 for c in checks[name]} for name in names}
    summary.limits = {name: {c.metric: f"{c.op} {c.limit:g}" for c in checks[name]} for name in names}
    agreement: Counter[str] = Counter({label: 0 for label in _ordered_labels(names)})
    columns = ["image_id", "status", "reason", "keep"]
    columns += [f"{n}_keep" for n in names] + [f"{n}_{c.metric}" for n in names for c in checks[n]]
    for chunk in _iter_columns(out, columns):
        for i, status in enumerate(chunk["status"]):
            summary.total += 1
            if status != "ok":
                summary.errored += 1
                if len(summary.errors) < max_errors:
                    summary.errors.append((chunk["image_id"][i], chunk["reason"][i]))
                continue
            summary.kept += bool(chunk["keep"][i])
            summary.rejected += not chunk["keep"][i]
            agreement[agreement_label([n for n in names if chunk[f"{n}_keep"][i]], names)] += 1
            for name in names:
                for check in checks[name]:
                    value = chunk[f"{name}_{check.metric}"][i]
                    if not check.passes(math.nan if value is None else value):
                        summary.failures[name][check.metric] += 1
    summary.agreement = dict(agreement)
    return summary


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sources_for_merge(out: Path, store: PartStore) -> list[Path]:
    """An existing ``out`` first, then the part files in order."""
    return ([out] if out.is_file() else []) + store.part_files()
