"""``prf calibrate``: choose per-model thresholds from labelled images and write a thresholds.yaml.

Legend: N labelled scored images, C candidate thresholds of one metric.

Labels: a CSV with columns ``image_id`` and ``keep`` (1 / 0, keep / reject, true / false, yes / no), or a
BATCH folder whose manifest's ``injected_failure`` says which images are failures (anything but "none").
Images that errored or have no label are left out. Where the labels name each failure's type (a BATCH's
``injected_failure``, or an optional ``failure_type`` column in the CSV), the result also says how many
failures of each type the chosen thresholds reject: one operating point for all types can catch one
kind of failure well and another poorly.

Search: each (model, metric) threshold is chosen among that metric's observed values (at most 256
quantiles) by coordinate ascent: one threshold at a time is set to its best value with the others fixed,
sweeping until nothing changes. Coordinate ascent is greedy, so it runs from several starts and keeps the
best end point: thresholds that keep every image, and, for each (model, metric), that threshold alone at
its best Matthews correlation. (A single start from "keep everything" locks into "reject everything" when
that is the best first move, as it is for F1 whenever no one metric alone beats it: with 60% of the images
failures, rejecting all scores F1 0.75. No later single coordinate can undo it; a start where one
threshold already rejects the failures it sees lets the others add theirs; with ``combine: any`` it is the
only way in, as a model without thresholds keeps every image whatever the others say.) Objectives:

- default ``f1``: the best F1 of the rejected images as a detector of failures (ties go to the looser
  threshold);
- ``mcc``: the best Matthews correlation between "rejected" and "failure"; unlike F1 it scores the
  degenerate "reject everything" as 0, so prefer it when failures are a large share of the labels;
- ``target_precision`` P: starting from the thresholds of the objective above, the loosest thresholds
  whose KEPT images are at least a share P faithful (precision of the kept set), i.e. the most faithful
  images kept subject to that precision. Coordinate ascent is greedy, not an exhaustive search over all
  combinations.

The combine rule (all / any), the PCK alpha and normalisation are those the SCORES file was made with, so
the written thresholds mean the same thing as the columns they were chosen on.

``max_rel_kp_error`` (prf.thresholds.RelativeKeypointErrorThreshold) is computed here, not read from the
SCORES column: its per-keypoint scales are measured first, as each keypoint's median error (the SCORES'
``<M>_keypoint_errors``) over the labelled FAITHFUL images, then every image's largest scaled error is
searched like any other metric, and the scales are written next to the chosen maximum. A keypoint seen on
fewer than ``MIN_SCALE_IMAGES`` faithful images takes the median of the other keypoints' scales. Where
the SCORES hold the flip test's per-keypoint disagreement (``<M>_keypoint_flip_gaps``), the scale of
keypoint n on an image is widened to ``scales[n] + w * gap_n``, with the weight w chosen among
``FLIP_WEIGHTS`` as the one whose largest scaled error best separates failures from faithful images
(AUROC on these labelled images; ties go to the smaller weight, 0 = not widened).
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from prf.data.io import atomic_write_bytes, check_output_file
from prf.score_io import now_iso, read_provenance, read_thresholds_of
from prf.thresholds import (
    METRICS,
    NUM_KEYPOINTS,
    ModelThresholds,
    PCKThreshold,
    RelativeKeypointErrorThreshold,
    ThresholdsConfig,
    checkpoint_mismatches,
    dump_thresholds,
    resolve_checkpoint,
)

DEFAULT_METRICS = ("pa_mpjpe", "s_mpjpe", "pck")
MAX_CANDIDATES = 256
MAX_SWEEPS = 12
MIN_SCALE_IMAGES = 20  # faithful images that must show a keypoint for its own scale (module docstring)
RELATIVE = "max_rel_kp_error"
FLIP_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)  # candidates for max_relative_keypoint_error.flip_weight
OBJECTIVES = {"f1": "best F1 of rejects", "mcc": "best Matthews correlation of rejects with failures"}
_TRUE = {"1", "keep", "true", "yes", "kept", "ok"}
_FALSE = {"0", "reject", "false", "no", "rejected", "failure"}


def load_labels(labels: str | os.PathLike[str]) -> dict[str, bool]:
    """image_id -> True for a FAILURE (an image that should be rejected), from a CSV or a BATCH folder."""
    return read_labels(labels)[0]


def read_labels(labels: str | os.PathLike[str]) -> tuple[dict[str, bool], dict[str, str]]:
    """The labels, read once: (``load_labels``' image_id -> failure, image_id -> failure type for the
    failures whose type the labels name: a BATCH's ``injected_failure``, or a CSV's optional
    ``failure_type`` column; empty when there is none)."""
    path = Path(labels)
    if not path.exists():
        raise FileNotFoundError(f"labels {path} do not exist (a CSV with image_id,keep or a BATCH folder)")
    if path.is_dir():
        from prf.data.batch import BatchReader

        manifest = BatchReader(path).manifest
        kinds = dict(zip(manifest["image_id"], manifest["injected_failure"], strict=True))
        return {i: kind != "none" for i, kind in kinds.items()}, _failure_types(kinds)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in ("image_id", "keep") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: needs columns image_id and keep, missing {missing} (has {list(frame.columns)})"
        )
    out: dict[str, bool] = {}
    for line, (image_id, value) in enumerate(zip(frame["image_id"], frame["keep"], strict=True), start=2):
        text = value.strip().lower()
        if text not in _TRUE | _FALSE:
            raise ValueError(f"{path} line {line}: keep must be 1/0 or keep/reject, got {value!r}")
        out[image_id] = text in _FALSE
    if "failure_type" not in frame.columns:
        return out, {}
    kinds = dict(zip(frame["image_id"], frame["failure_type"], strict=True))
    return out, _failure_types({i: kind for i, kind in kinds.items() if out[i]})


def _failure_types(kinds: dict[str, str]) -> dict[str, str]:
    """Drop the images whose type is empty or "none" (faithful ones)."""
    return {image_id: kind for image_id, kind in kinds.items() if kind.strip() not in ("", "none")}


@dataclass
class Curve:
    """ROC and precision-recall of one metric as a failure detector (higher = more likely a failure)."""

    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    auroc: float


@dataclass
class CheckResult:
    """Thresholds judged on labelled images they were NOT chosen on (``evaluate_thresholds``)."""

    scores: Path
    labelled: int
    failures: int
    precision: float
    recall: float
    f1: float
    mcc: float
    false_positive_rate: float
    # model name -> its own verdict's figures ("precision", "recall", "f1", "mcc", "fpr") on these images
    alone: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    """Chosen thresholds and their quality on the labelled images (reject = positive class)."""

    config: ThresholdsConfig
    objective: str
    labelled: int
    failures: int
    kept: int
    precision: float
    recall: float
    f1: float
    keep_precision: float
    false_positive_rate: float
    mcc: float  # Matthews correlation of "rejected" with "failure" (the mcc objective)
    check: CheckResult | None = None  # the same thresholds on a second labelled SCORES file, if given
    # model name -> its own verdict's figures (see CheckResult.alone) on the calibration images
    alone: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    rejected_by_type: dict[str, tuple[int, int]] = field(default_factory=dict)  # type -> (rejected, total)
    out: Path | None = None
    plot: Path | None = None

    def renderable(self) -> Any:
        """A rich table of the chosen values and the resulting precision / recall / F1."""
        from rich.console import Group
        from rich.table import Table

        chosen = Table(title=f"prf calibrate ({self.objective}, combine: {self.config.combine})")
        for column in ("model", "metric", "threshold", "AUROC alone"):
            chosen.add_column(column)
        for name, model in self.config.models.items():
            for check in model.checks():
                curve = self.curves.get(f"{name}_{check.metric}")
                auroc = f"{curve.auroc:.3f}" if curve is not None else "-"
                limit = f"{check.op} {check.limit:.6g} {METRICS[check.metric][2]}"
                relative = model.max_relative_keypoint_error
                if check.metric == RELATIVE and relative is not None and relative.flip_weight:
                    limit += f" (+ {relative.flip_weight:g} x its flip gap)"
                chosen.add_row(name, check.metric, limit, auroc)
        quality = Table(
            title=f"on {self.labelled} labelled images ({self.failures} failures)", show_header=False
        )
        quality.add_row(
            "rejects: precision / recall / F1", f"{self.precision:.3f} / {self.recall:.3f} / {self.f1:.3f}"
        )
        quality.add_row("kept images", f"{self.kept} ({self.keep_precision:.3f} of them faithful)")
        quality.add_row("faithful images rejected", f"{self.false_positive_rate:.3f}")
        quality.add_row("Matthews correlation", f"{self.mcc:.3f}")
        if len(self.alone) > 1:
            quality.add_row("each model alone: Matthews correlation / F1", _alone_text(self.alone))
        if self.check is not None:
            c = self.check
            quality.add_row(
                f"check set ({c.labelled} labelled, {c.failures} failures): precision / recall / F1",
                f"{c.precision:.3f} / {c.recall:.3f} / {c.f1:.3f}",
            )
            quality.add_row("check set: Matthews correlation", f"{c.mcc:.3f}")
            quality.add_row("check set: faithful images rejected", f"{c.false_positive_rate:.3f}")
            if len(c.alone) > 1:
                quality.add_row(
                    "check set, each model alone: Matthews correlation / F1", _alone_text(c.alone)
                )
        if not self.rejected_by_type:
            return Group(chosen, quality)
        by_type = Table(title="failures rejected, by type")
        for column in ("failure type", "rejected", "recall"):
            by_type.add_column(column)
        for kind, (rejected, total) in self.rejected_by_type.items():
            by_type.add_row(kind, f"{rejected} / {total}", f"{rejected / total:.3f}")
        return Group(chosen, quality, by_type)


def model_alone_quality(passes: dict[str, np.ndarray], failure: np.ndarray) -> dict[str, dict[str, float]]:
    """Each model's own verdict judged alone: model name -> precision, recall, F1, Matthews correlation
    and faithful images rejected (``fpr``) of rejecting where that model's thresholds fail (``passes``:
    name -> (N,) bool). Beside the combined verdict it shows what each model adds: a model whose thresholds
    did not carry over can make the intersection worse than the other model alone."""
    keys = ("precision", "recall", "f1", "mcc", "fpr")
    quality = {name: _quality(ok[:, None], failure) for name, ok in passes.items()}
    return {name: {key: float(q[key][0]) for key in keys} for name, q in quality.items()}


def _alone_text(alone: dict[str, dict[str, float]]) -> str:
    """ "A 0.546 / 0.702, B 0.412 / 0.655" """
    return ", ".join(f"{name} {q['mcc']:.3f} / {q['f1']:.3f}" for name, q in alone.items())


def _alone_sentence(alone: dict[str, dict[str, float]]) -> str:
    """ " Each model alone (Matthews correlation / F1): A ..., B ...." (empty for one model)."""
    return f" Each model alone (Matthews correlation / F1): {_alone_text(alone)}." if len(alone) > 1 else ""


def _badness(values: np.ndarray, metric: str) -> np.ndarray:
    """Metric -> a score where larger is worse (PCK is negated); NaN stays NaN (it never passes)."""
    return -values if METRICS[metric][1] == ">=" else values


def _candidates(bad: np.ndarray) -> np.ndarray:
    """Observed values (at most MAX_CANDIDATES quantiles), ascending, then +inf meaning "no threshold"."""
    finite = np.unique(bad[np.isfinite(bad)])
    if finite.size > MAX_CANDIDATES:
        finite = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, MAX_CANDIDATES), method="nearest"))
    return np.append(finite, np.inf)


def _passes(bad: np.ndarray, limit: np.ndarray | float) -> np.ndarray:
    """bad <= limit, where an infinite limit (no threshold) passes everything, NaN included."""
    return (bad <= limit) | np.isinf(limit)


def _quality(keep: np.ndarray, failure: np.ndarray) -> dict[str, np.ndarray]:
    """keep (N, C) bool, failure (N,) bool -> per-candidate counts and scores (reject = positive)."""
    f = failure[:, None]
    tp = (~keep & f).sum(0).astype(float)
    fp = (~keep & ~f).sum(0).astype(float)
    fn = (keep & f).sum(0).astype(float)
    kept = keep.sum(0).astype(float)
    kept_good = (keep & ~f).sum(0).astype(float)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0
    )
    keep_precision = np.divide(kept_good, kept, out=np.zeros_like(tp), where=kept > 0)
    fpr = np.divide(fp, (~failure).sum(), out=np.zeros_like(tp), where=(~failure).sum() > 0)
    tn = (keep & ~f).sum(0).astype(float)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.divide(tp * tn - fp * fn, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "keep_precision": keep_precision,
            "kept": kept, "kept_good": kept_good, "fpr": fpr, "mcc": mcc}  # fmt: skip


class _Search:
    """Coordinate ascent over one threshold per (model, metric) (module docstring)."""

    def __init__(self, bad: dict[tuple[str, str], np.ndarray], failure: np.ndarray, combine: str) -> None:
        self.bad, self.failure, self.combine = bad, failure, combine
        self.models = list(dict.fromkeys(m for m, _ in bad))
        self.candidates = {key: _candidates(values) for key, values in bad.items()}
        self.limits = {key: np.inf for key in bad}  # start: no thresholds, every image kept

    def model_pass(self, model: str, skip: tuple[str, str] | None = None) -> np.ndarray:
        ok = np.ones(self.failure.shape, dtype=bool)
        for key, values in self.bad.items():
            if key[0] == model and key != skip:
                ok &= _passes(values, self.limits[key])
        return ok

    def keep(self) -> np.ndarray:
        passes = np.stack([self.model_pass(m) for m in self.models])
        return passes.all(0) if self.combine == "all" else passes.any(0)

    def _keep_for(self, key: tuple[str, str]) -> np.ndarray:
        """(N, C) final verdict for each candidate of ``key`` with the other thresholds fixed."""
        this = _passes(self.bad[key][:, None], self.candidates[key][None, :])
        model_pass = self.model_pass(key[0], skip=key)[:, None] & this
        others = [self.model_pass(m) for m in self.models if m != key[0]]
        if not others:
            return model_pass
        rest = np.stack(others)
        if self.combine == "all":
            return rest.all(0)[:, None] & model_pass
        return rest.any(0)[:, None] | model_pass

    def give_every_model_a_threshold(self) -> None:
        """A model none of whose thresholds helped gets its first metric at the loosest observed value
        (the schema needs one threshold per model)."""
        for model in self.models:
            keys = [key for key in self.bad if key[0] == model]
            if all(np.isinf(self.limits[key]) for key in keys):
                observed = self.candidates[keys[0]][:-1]
                if observed.size == 0:
                    raise ValueError(
                        f"cannot calibrate model {model}: {keys[0][1]} is undefined on every image"
                    )
                self.limits[keys[0]] = observed[-1]

    def value(self, score: Any) -> tuple:
        """The objective of the current thresholds."""
        return tuple(score(_quality(self.keep()[:, None], self.failure))[0])

    def run_multistart(self, score: Any) -> None:
        """``run`` from every start in the module docstring; keep the limits of the best end point."""
        none = {k: np.inf for k in self.bad}
        starts = [dict(self.limits)]
        for key, cands in self.candidates.items():
            # this threshold's own verdicts (under "any" the final verdict would keep every image: the
            # models without a threshold keep them all, so every candidate would look the same)
            mcc = _quality(_passes(self.bad[key][:, None], cands[None, :]), self.failure)["mcc"]
            best = max(range(cands.size), key=lambda c: (mcc[c], c))
            starts.append({**none, key: cands[best]})
        best_value, best_limits = None, starts[0]
        for start in starts:
            self.limits = dict(start)
            self.run(score)
            value = self.value(score)
            if best_value is None or value > best_value:
                best_value, best_limits = value, dict(self.limits)
        self.limits = best_limits

    def run(self, score: Any) -> None:
        """Maximise ``score(quality dict) -> (C,) structured objective`` coordinate by coordinate."""
        for _ in range(MAX_SWEEPS):
            changed = False
            for key, cands in self.candidates.items():
                objective = score(_quality(self._keep_for(key), self.failure))
                best = max(range(cands.size), key=lambda c: (*objective[c], c))  # ties: the looser one
                if cands[best] != self.limits[key]:
                    self.limits[key], changed = cands[best], True
            if not changed:
                return


def _curve(bad: np.ndarray, failure: np.ndarray) -> Curve | None:
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

    if failure.all() or not failure.any():
        return None
    worst = np.nanmax(bad) + 1.0 if np.isfinite(bad).any() else 1.0
    filled = np.where(np.isfinite(bad), bad, worst)
    fpr, tpr, _ = roc_curve(failure, filled)
    precision, recall, _ = precision_recall_curve(failure, filled)
    return Curve(fpr, tpr, precision, recall, float(roc_auc_score(failure, filled)))


def check_labels_belong(labels: str | os.PathLike[str], provenance: dict[str, Any], scores: Path) -> None:
    """Refuse a BATCH's labels for SCORES of another BATCH that still exists: BATCH image ids
    (``00000000``, ...) repeat across batches, so the wrong batch's labels would match every row."""
    labels_path, scored = Path(labels), provenance.get("input")
    if not labels_path.is_dir() or provenance.get("input_kind") != "batch" or not scored:
        return
    if Path(scored).is_dir() and os.path.realpath(labels_path) != os.path.realpath(scored):
        raise ValueError(
            f"{scores} scored the BATCH {scored}, but the labels are those of the BATCH {labels_path}; "
            "pass the scored batch's folder (or a CSV) as the labels"
        )


def _checkpoint_hashes(provenance: dict[str, Any]) -> dict[str, str]:
    """Model name -> sha256 of the checkpoint that made a SCORES file (its provenance)."""
    return {m["name"]: m["sha256"] for m in provenance["models"]}


def _checkpoint_keys(
    provenance: dict[str, Any], source: ThresholdsConfig, out: Path
) -> dict[str, str | None]:
    """Model name -> the ``checkpoint`` to write in the thresholds file ``out``: the checkpoint that made
    the SCORES (what the thresholds are calibrated for), else the source file's own key; a path relative
    to ``out``'s folder, as ``prf score`` resolves it (the source's relative keys were relative to the
    source file's folder)."""
    scored = {m["name"]: m.get("checkpoint") for m in provenance["models"]}
    source_path = provenance["thresholds"].get("path")
    folder = Path(os.path.abspath(out)).parent
    keys: dict[str, str | None] = {}
    anchor = Path(source_path) if source_path is not None else None
    for name, model in source.models.items():
        path = resolve_checkpoint(scored.get(name) or model.checkpoint, anchor)
        if path is None or (anchor is None and not path.is_absolute()):  # nothing to resolve it against
            keys[name] = None if path is None else str(path)
        else:
            keys[name] = os.path.relpath(os.path.abspath(path), folder)
    return keys


def _load_table(scores: Path, names: list[str], metrics: list[str]) -> pd.DataFrame:
    """The SCORES' columns that ``metrics`` need (``max_rel_kp_error``: the per-keypoint errors, and the
    flip gaps where the file has them), with image_id and status."""
    columns = ["image_id", "status"]
    for name in names:
        columns += [f"{name}_{m}" if m != RELATIVE else f"{name}_keypoint_errors" for m in metrics]
    available = pq.read_schema(scores).names
    missing = [c for c in columns if c not in available]
    if missing:
        hint = (
            " (a prf older than --metric max_rel_kp_error wrote no per-keypoint errors: score again)"
            if any(c.endswith("_keypoint_errors") for c in missing)
            else "; was it written by prf score?"
        )
        raise ValueError(f"{scores} lacks the columns {missing}{hint}")
    if RELATIVE in metrics:  # optional: files from a prf before them, or models without a flip test
        columns += [c for name in names if (c := f"{name}_keypoint_flip_gaps") in available]
    return pq.read_table(scores, columns=columns).to_pandas()


def keypoint_error_scales(errors: np.ndarray, faithful: np.ndarray) -> np.ndarray:
    """(N, K) per-keypoint errors (NaN = not visible or undefined), (N,) bool -> (K,) scales: each
    keypoint's median error over the faithful images (module docstring for rarely seen keypoints)."""
    good = errors[faithful]
    seen = np.isfinite(good).sum(axis=0)
    if not (seen >= MIN_SCALE_IMAGES).any():
        raise ValueError(
            f"cannot measure keypoint error scales: no keypoint is visible on {MIN_SCALE_IMAGES} or more "
            f"faithful labelled images ({int(faithful.sum())} faithful images)"
        )
    enough = seen >= MIN_SCALE_IMAGES
    medians = np.array([np.median(column[np.isfinite(column)]) if ok else np.nan
                        for column, ok in zip(good.T, enough, strict=True)])  # fmt: skip
    scales = np.where(enough, medians, np.median(medians[enough]))
    # an exact zero (a perfect keypoint on every image) would make every error infinitely large; four
    # significant digits are what the thresholds file shows, so the limit is chosen on the written scales
    return np.array([float(f"{v:.4g}") for v in np.maximum(scales, 1e-6)])


def _per_keypoint(table: pd.DataFrame, column: str) -> np.ndarray:
    """A list column of K floats per row (or null) -> (N, K) float64, null rows (and a missing column)
    NaN."""
    if column not in table.columns:
        return np.full((len(table), NUM_KEYPOINTS), np.nan)
    rows = [np.asarray(v, dtype=float) if v is not None else np.full(NUM_KEYPOINTS, np.nan)
            for v in table[column]]  # fmt: skip
    matrix = np.stack(rows) if rows else np.zeros((0, NUM_KEYPOINTS))
    if matrix.shape[1:] != (NUM_KEYPOINTS,):
        raise ValueError(f"{column}: expected {NUM_KEYPOINTS} values per row, got shape {matrix.shape}")
    return matrix


def _keypoint_errors(table: pd.DataFrame, name: str) -> np.ndarray:
    """Model ``name``'s ``<name>_keypoint_errors`` -> (N, K) float64, null rows NaN."""
    return _per_keypoint(table, f"{name}_keypoint_errors")


def _flip_gaps(table: pd.DataFrame, name: str) -> np.ndarray:
    """Model ``name``'s ``<name>_keypoint_flip_gaps`` -> (N, K) float64; NaN rows where there are none."""
    return _per_keypoint(table, f"{name}_keypoint_flip_gaps")


def relative_errors(
    errors: np.ndarray, scales: np.ndarray, gaps: np.ndarray | None = None, flip_weight: float = 0.0
) -> np.ndarray:
    """(N, K) errors, (K,) scales [, (N, K) flip gaps and their weight] -> (N,) largest scaled error per
    image, ``max_n e_n / (scales[n] + flip_weight * g_n)``; NaN where none is defined."""
    widened = scales[None, :] if not flip_weight else scales[None, :] + flip_weight * gaps
    scaled = errors / widened
    finite = np.isfinite(scaled)
    largest = np.where(finite, scaled, -np.inf).max(axis=1, initial=-np.inf)
    return np.where(finite.any(axis=1), largest, np.nan)


def choose_flip_weight(
    errors: np.ndarray, scales: np.ndarray, gaps: np.ndarray, failure: np.ndarray
) -> float:
    """The ``FLIP_WEIGHTS`` entry whose relative error has the best AUROC for ``failure`` (module
    docstring); 0 when some image has no flip gaps (a model without a flip test, an older SCORES file)."""
    if not np.isfinite(gaps).all():
        return 0.0
    best, best_auroc = 0.0, -1.0
    for weight in FLIP_WEIGHTS:
        curve = _curve(relative_errors(errors, scales, gaps, weight), failure)
        if curve is not None and curve.auroc > best_auroc + 1e-9:
            best, best_auroc = weight, curve.auroc
    return best


def evaluate_thresholds(
    config: ThresholdsConfig, scores: str | os.PathLike[str], labels: str | os.PathLike[str]
) -> CheckResult:
    """The verdicts ``config`` would give the images of another labelled SCORES file, against its labels:
    how a set of thresholds (or a choice of metrics) carries over to images it was not fitted to.

    The metrics are the SCORES' columns, except ``max_rel_kp_error``, recomputed from the per-keypoint
    errors with ``config``'s scales. The SCORES must have the same model names, be made by the
    checkpoints ``config`` was calibrated for (where it names them: ``calibrated_for_sha256``) and, where
    ``config`` checks PCK, with the same PCK alpha and normalisation (its pck column means nothing else).
    """
    scores = Path(scores)
    if not scores.is_file():
        raise FileNotFoundError(f"check SCORES file {scores} does not exist (make it with prf score)")
    provenance = read_provenance(scores)
    check_labels_belong(labels, provenance, scores)
    source = read_thresholds_of(provenance)
    names = config.model_names()
    if source.model_names() != names:
        raise ValueError(
            f"{scores} was scored with models {source.model_names()}, the thresholds are for {names}"
        )
    mismatched = checkpoint_mismatches(config, _checkpoint_hashes(provenance))
    if mismatched:  # named by the first such model
        name, (expected, actual) = next(iter(mismatched.items()))
        raise ValueError(
            f"{scores}: model {name} was scored with checkpoint sha256 {str(actual)[:12]}..., the thresholds "
            f"were calibrated for {expected[:12]}...; score the check set with the same checkpoints"
        )
    for name in names:
        wanted, made = config.models[name], source.models[name].pck_settings
        if wanted.pck is not None and (wanted.pck.alpha, wanted.pck.normalization) != (
            made.alpha,
            made.normalization,
        ):
            raise ValueError(
                f"{scores}: its {name}_pck is PCK@{made.alpha} ({made.normalization}), the thresholds check "
                f"PCK@{wanted.pck.alpha} ({wanted.pck.normalization}); score it with matching pck settings"
            )
    label_of, _ = read_labels(labels)
    metrics = sorted({c.metric for name in names for c in config.models[name].checks()})
    table = _load_table(scores, names, metrics)
    table = table[(table["status"] == "ok") & table["image_id"].isin(label_of.keys())]
    failure = np.array([label_of[i] for i in table["image_id"]], dtype=bool)
    if failure.size == 0:
        raise ValueError(f"{scores}: no scored image has a label in {labels}")
    passes = {}
    for name in names:
        model = config.models[name]
        ok = np.ones(failure.shape, dtype=bool)
        for check in model.checks():
            relative = model.max_relative_keypoint_error
            if check.metric == RELATIVE and relative is not None:
                gaps = _flip_gaps(table, name)
                if relative.flip_weight and not np.isfinite(gaps).all():
                    raise ValueError(
                        f"{scores}: the thresholds widen {name}'s keypoint scales by the flip test's "
                        f"disagreement (flip_weight {relative.flip_weight:g}), but {name}_keypoint_flip_gaps "
                        "is missing or null on some rows; score the check set with this prf and a "
                        "checkpoint that has a flip test"
                    )
                values = relative_errors(
                    _keypoint_errors(table, name), np.asarray(relative.scales), gaps, relative.flip_weight
                )
            else:
                values = table[f"{name}_{check.metric}"].to_numpy(dtype=float)
            # the search's own verdict (NaN fails), vectorised: the same as Check.passes per value
            ok &= _passes(
                _badness(values, check.metric), float(_badness(np.float64(check.limit), check.metric))
            )
        passes[name] = ok
    every = list(passes.values())
    keep = np.all(every, axis=0) if config.combine == "all" else np.any(every, axis=0)
    q = {k: float(v[0]) for k, v in _quality(keep[:, None], failure).items()}
    return CheckResult(scores, int(failure.size), int(failure.sum()), q["precision"], q["recall"], q["f1"],
                       q["mcc"], q["fpr"], model_alone_quality(passes, failure))  # fmt: skip


def calibrate(
    scores: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    target_precision: float | None = None,
    out: str | os.PathLike[str] = "thresholds.yaml",
    plot: str | os.PathLike[str] | None = None,
    metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
    objective: str = "f1",
    check_scores: str | os.PathLike[str] | None = None,
    check_labels: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
) -> CalibrationResult:
    """Choose thresholds on SCORES + labels (module docstring), write ``out`` and the ROC / PR plot.

    Args:
        scores: a SCORES Parquet file from ``prf score``.
        labels: CSV (image_id, keep) or a BATCH folder (injected_failure != "none" = reject).
        target_precision: None for the objective alone, else the share of kept images that must be
            faithful (0-1).
        out: thresholds.yaml to write (atomically); plot: PNG (default ``<out stem>.roc.png``).
        metrics: which metrics get thresholds (column suffixes: pa_mpjpe, s_mpjpe, pck, max_kp_error,
            max_rel_kp_error).
        objective: "f1" or "mcc" (module docstring); the start for ``target_precision``.
        check_scores, check_labels: optionally a second labelled SCORES file (made with the same models)
            on which the chosen thresholds are judged too (``evaluate_thresholds``); it never influences
            the choice. Compare metric sets by this, not by the calibration images' own figures.
        overwrite: False refuses an existing ``out`` (``prf calibrate`` without ``--force``).
    """
    scores, out = Path(scores), Path(out)
    metrics = list(dict.fromkeys(metrics))  # a metric named twice is still one threshold
    check_output_file(out, "--out", "thresholds.yaml")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
    if target_precision is not None and not 0.0 < target_precision <= 1.0:
        raise ValueError(f"--target-precision is a share in (0, 1], got {target_precision}")
    if not scores.is_file():
        raise FileNotFoundError(f"SCORES file {scores} does not exist (make it with prf score)")
    if (check_scores is None) != (check_labels is None):
        raise ValueError("give both --check-scores and --check-labels, or neither")
    if check_scores is not None and not Path(check_scores).is_file():
        raise FileNotFoundError(f"check SCORES file {check_scores} does not exist (make it with prf score)")
    if out.is_file() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    provenance = read_provenance(scores)
    check_labels_belong(labels, provenance, scores)
    source = read_thresholds_of(provenance)
    names = source.model_names()
    label_of, failure_types = read_labels(labels)
    table = _load_table(scores, names, list(metrics))
    table = table[(table["status"] == "ok") & table["image_id"].isin(label_of.keys())]
    failure = np.array([label_of[i] for i in table["image_id"]], dtype=bool)
    if failure.size == 0 or failure.all() or not failure.any():
        raise ValueError(
            f"need labelled scored images of both kinds; found {int(failure.sum())} failures and "
            f"{int((~failure).sum())} faithful among {len(table)} scored images with a label"
        )
    scales: dict[str, np.ndarray] = {}
    flip_weights: dict[str, float] = {}
    bad = {}
    for name in names:
        for m in metrics:
            if m == RELATIVE:  # the scales and flip weight first, from this table's labelled images
                errors, gaps = _keypoint_errors(table, name), _flip_gaps(table, name)
                scales[name] = keypoint_error_scales(errors, ~failure)
                flip_weights[name] = choose_flip_weight(errors, scales[name], gaps, failure)
                bad[(name, m)] = relative_errors(errors, scales[name], gaps, flip_weights[name])
            else:
                bad[(name, m)] = _badness(table[f"{name}_{m}"].to_numpy(dtype=float), m)
    search = _Search(bad, failure, source.combine)
    search.run_multistart(lambda q: list(zip(q[objective], q["kept"] > 0, q["kept"], strict=True)))
    described = OBJECTIVES[objective]
    if target_precision is not None:
        goal = target_precision
        search.run(
            lambda q: [
                (p >= goal, g if p >= goal else p)
                for p, g in zip(q["keep_precision"], q["kept_good"], strict=True)
            ]
        )
        described = f"kept images >= {goal:g} faithful"
    search.give_every_model_a_threshold()
    config = _to_config(
        search, source, list(metrics), scales, flip_weights, _checkpoint_hashes(provenance),
        _checkpoint_keys(provenance, source, out),
    )  # fmt: skip
    keep = search.keep()
    final = {k: float(v[0]) for k, v in _quality(keep[:, None], failure).items()}
    result = CalibrationResult(
        config=config,
        objective=described,
        labelled=int(failure.size),
        failures=int(failure.sum()),
        kept=int(final["kept"]),
        precision=final["precision"],
        recall=final["recall"],
        f1=final["f1"],
        keep_precision=final["keep_precision"],
        false_positive_rate=final["fpr"],
        mcc=final["mcc"],
        curves={f"{n}_{m}": c for (n, m), v in bad.items() if (c := _curve(v, failure)) is not None},
        rejected_by_type=_rejected_by_type(keep, table["image_id"], failure_types),
        alone=model_alone_quality({m: search.model_pass(m) for m in search.models}, failure),
    )
    if target_precision is not None and result.keep_precision < target_precision:
        raise ValueError(
            f"no thresholds found whose kept images are >= {target_precision:g} faithful (best "
            f"{result.keep_precision:.3f}); lower --target-precision or add --metric max_kp_error"
        )
    if check_scores is not None and check_labels is not None:
        result.check = evaluate_thresholds(config, check_scores, check_labels)
    header = _header(result, scores, provenance)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, dump_thresholds(config, header).encode("utf-8"))
    result.out = out
    result.plot = _plot(result, Path(plot) if plot else out.with_suffix(".roc.png"), search, failure)
    return result


def _rejected_by_type(
    keep: np.ndarray, image_ids: pd.Series, types: dict[str, str]
) -> dict[str, tuple[int, int]]:
    """Failure type -> (rejected, total) over the scored labelled images (``keep``: (N,) bool verdicts)."""
    kinds = np.array([types.get(image_id, "") for image_id in image_ids], dtype=object)
    return {
        kind: (int((~keep[kinds == kind]).sum()), int((kinds == kind).sum()))
        for kind in sorted(set(kinds) - {""})
    }


def _round_between(limit: float, next_limit: float) -> float:
    """The roundest number in [limit, next_limit) (same decisions on the labelled images, nicer YAML)."""
    for decimals in range(7):
        scale = 10.0**decimals
        rounded = math.ceil(limit * scale) / scale
        if rounded < next_limit:
            return rounded
    return limit


def _to_config(
    search: _Search,
    source: ThresholdsConfig,
    metrics: list[str],
    scales: dict[str, np.ndarray],
    flip_weights: dict[str, float],
    hashes: dict[str, str],
    checkpoints: dict[str, str | None],
) -> ThresholdsConfig:
    """The chosen limits as a config (rounded between observed values; ``scales``, ``flip_weights``:
    model -> the keypoint error scales and flip weight chosen for ``max_rel_kp_error``, written with its
    maximum; ``hashes``: model -> the sha256 of the checkpoint that made the SCORES, written as
    ``calibrated_for_sha256``; ``checkpoints``: model -> its ``checkpoint`` key, ``_checkpoint_keys``)."""
    models = {}
    for name, original in source.models.items():
        limits = {m: search.limits[(name, m)] for m in metrics}
        value: dict[str, float | None] = {}
        for m, limit in limits.items():
            if math.isinf(limit):
                value[m] = None
                continue
            observed = search.bad[(name, m)]
            above = observed[observed > limit]  # every observed value, not just the candidates
            above = np.sort(above)
            nice = _round_between(float(limit), float(above[0]) if above.size else math.inf)
            value[m] = float(_badness(np.float64(nice), m)) + 0.0  # + 0.0: no "-0.0" in the YAML
        pck = None
        if value.get("pck") is not None:
            settings = original.pck_settings
            pck = PCKThreshold(alpha=settings.alpha, normalization=settings.normalization, min=value["pck"])
        relative = None
        if value.get(RELATIVE) is not None:
            relative = RelativeKeypointErrorThreshold(
                max=value[RELATIVE], scales=scales[name].tolist(), flip_weight=flip_weights[name]
            )
        models[name] = ModelThresholds(
            checkpoint=checkpoints[name],
            calibrated_for_sha256=hashes.get(name),
            pa_mpjpe_max=value.get("pa_mpjpe"),
            s_mpjpe_max=value.get("s_mpjpe"),
            pck=pck,
            max_keypoint_error_max=value.get("max_kp_error"),
            max_relative_keypoint_error=relative,
        )
    return ThresholdsConfig(combine=source.combine, models=models)


def _header(result: CalibrationResult, scores: Path, provenance: dict[str, Any]) -> str:
    checkpoints = ", ".join(f"{m['name']} sha256 {m['sha256'][:16]}" for m in provenance["models"])
    text = (
        f"Calibrated by `prf calibrate` on {now_iso()} from {scores} ({result.labelled} labelled images, "
        f"{result.failures} failures).\nObjective: {result.objective}. Rejects: precision "
        f"{result.precision:.3f}, recall {result.recall:.3f}, F1 {result.f1:.3f}; kept {result.kept} images, "
        f"{result.keep_precision:.3f} of them faithful.{_alone_sentence(result.alone)}\n"
        f"{_by_type_line(result)}{_check_line(result)}"
        "Valid for the checkpoints "
        f"scored: {checkpoints}.\n"
        "Units: mm for the MPJPEs, percent for pck.min, sqrt(mask area) for max_keypoint_error_max and for "
        "max_relative_keypoint_error.scales, whose max is in multiples of each keypoint's scale (widened by "
        "flip_weight x the flip test's disagreement on that keypoint, same unit)."
    )
    return "\n".join(textwrap.fill(line, 100) for line in text.splitlines())


def _check_line(result: CalibrationResult) -> str:
    """ "On the check set ...: precision ..., Matthews correlation ....\n" (empty without one)."""
    c = result.check
    if c is None:
        return ""
    return (
        f"On the check set {c.scores} ({c.labelled} labelled images, {c.failures} failures): precision "
        f"{c.precision:.3f}, recall {c.recall:.3f}, F1 {c.f1:.3f}, Matthews correlation {c.mcc:.3f}, "
        f"faithful images rejected {c.false_positive_rate:.3f}.{_alone_sentence(c.alone)}\n"
    )


def _by_type_line(result: CalibrationResult) -> str:
    """ "Failures rejected by type: head_turn 66/101, ...\n" (empty without failure types)."""
    if not result.rejected_by_type:
        return ""
    parts = ", ".join(f"{kind} {r}/{n}" for kind, (r, n) in result.rejected_by_type.items())
    return f"Failures rejected by type: {parts}.\n"


def _plot(result: CalibrationResult, path: Path, search: _Search, failure: np.ndarray) -> Path:
    """ROC and precision-recall curves of every metric alone, with the chosen filter's operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.8))
    for key, curve in result.curves.items():
        roc.plot(curve.fpr, curve.tpr, label=f"{key} (AUROC {curve.auroc:.2f})")
        pr.plot(curve.recall, curve.precision, label=key)
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.scatter(
        [result.false_positive_rate], [result.recall], color="black", zorder=5, label="chosen thresholds"
    )
    pr.scatter([result.recall], [result.precision], color="black", zorder=5, label="chosen thresholds")
    pr.axhline(float(failure.mean()), color="grey", linestyle=":", linewidth=1)
    roc.set(xlabel="faithful images rejected (FPR)", ylabel="failures rejected (TPR)", title="ROC")
    pr.set(xlabel="recall of failures", ylabel="precision of rejects", title="precision-recall")
    for axis in (roc, pr):
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result.labelled} labelled images, {result.failures} failures; combine: {search.combine}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
