"""Filter-quality statistics shared by the benchmarks: labels, verdicts, precision / recall / F1, AUROC,
intervals over seeds, and the JSON / markdown / plot writers.

Conventions (every benchmark uses them):
- The POSITIVE class is "the image has an injected failure" (``injected_failure != "none"``); a filter's
  positive prediction is REJECTING the image. Precision = rejected failures / rejected images, recall =
  rejected failures / failures, F1 their harmonic mean. Precision is NaN when nothing was rejected, recall
  NaN when the subset has no failure.
- Subsets: ``all`` (every faithful image and every failure), one per failure type (that type's
  failures against ALL faithful images, so a type's precision counts every false alarm), and
  ``articulation``: the ARTICULATION types' failures pooled, against all faithful images (issue 7's
  "articulation failures" read as one group; each false alarm counts once against all of them).
- Effect size: with ``min_effect`` set, failures whose ``failure_effect`` (largest image-space keypoint
  displacement, sqrt(silhouette area) units; docs/batch-format.md) is below it are LEFT OUT of the subset
  (neither a miss when kept nor a hit when rejected): the injection barely changed the image, so the
  annotation is still about right (within PCK@0.15's tolerance). ``n_excluded`` says how many were left out.
- An image that a SCORES table marks ``status: error`` counts as rejected (a filter drops it); its metrics
  are NaN, which AUROC treats as the most suspicious value.
- AUROC is computed on scores oriented so that larger means "more likely a failure" (``higher_is_worse``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FAITHFUL = "none"
ALL = "all"
# Issue 7's "articulation failures (legs, leg length, head / neck, missing limb)": every type but flips.
ARTICULATION = ("leg_articulation", "leg_swap", "leg_length", "head_turn", "missing_limb")
POOLED = {"articulation": ARTICULATION}  # subset name -> the failure types it pools
LABEL_COLUMNS = ("image_id", "injected_failure", "failure_severity", "failure_effect")
# Column suffix -> (True when a larger value means a worse fit, i.e. more likely a failure; unit).
SCORE_SUFFIXES: dict[str, tuple[bool, str]] = {
    "_pa_mpjpe": (True, "mm"),
    "_s_mpjpe": (True, "mm"),
    "_pck": (False, "%"),
    "_max_kp_error": (True, "sqrt(mask area)"),
    "_max_rel_kp_error": (True, "x the keypoint's scale"),
    "_ce": (True, "nats"),
    "_ce_azimuth": (True, "nats"),
    "_ce_elevation": (True, "nats"),
    "_ce_theta": (True, "nats"),
    "_geodesic": (True, "radians"),
}


# ---- inputs -------------------------------------------------------------------------------------------
def load_labels(batch: str | os.PathLike[str]) -> pd.DataFrame:
    """The injected-failure labels of a BATCH: image_id, injected_failure, failure_severity, failure_effect
    (one row per image, sorted by image_id)."""
    from prf.data.batch import BatchReader

    manifest = BatchReader(batch).manifest
    return check_labels(manifest.loc[:, list(LABEL_COLUMNS)])


def check_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Validate a labels table (image_id, injected_failure, failure_effect; failure_severity optional)."""
    missing = [c for c in ("image_id", "injected_failure", "failure_effect") if c not in labels.columns]
    if missing:
        raise ValueError(
            f"labels table lacks columns {missing}; it needs image_id, injected_failure and failure_effect "
            "(a BATCH manifest has them: use load_labels(BATCH))"
        )
    if labels["image_id"].duplicated().any():
        dupes = labels.loc[labels["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise ValueError(f"labels table repeats image ids, e.g. {dupes}")
    effect = pd.to_numeric(labels["failure_effect"], errors="coerce")
    if effect.isna().any():
        raise ValueError("labels table has missing or non-numeric failure_effect values")
    out = labels.copy()
    out["failure_effect"] = effect.astype(float)
    return out.sort_values("image_id", ignore_index=True)


def read_scores(source: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    """A SCORES table (PRF or KCF layout) from a Parquet path, or a DataFrame passed through."""
    if isinstance(source, pd.DataFrame):
        frame = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"SCORES file {path} does not exist (run `prf score` or `kcf` first)")
        frame = pd.read_parquet(path)
    if "image_id" not in frame.columns:
        raise ValueError("SCORES table has no image_id column; is it a prf score / kcf output?")
    return frame


def aligned(labels: pd.DataFrame, column: pd.Series, what: str) -> np.ndarray:
    """``column`` (indexed by image_id) in the order of ``labels``; every labelled image must be there."""
    missing = labels.loc[~labels["image_id"].isin(column.index), "image_id"]
    if len(missing):
        raise ValueError(
            f"{what}: {len(missing)} labelled image(s) are not in the SCORES table, e.g. "
            f"{missing.head(3).tolist()}; score the whole batch (or pass labels of the scored images only)"
        )
    return column.loc[labels["image_id"]].to_numpy()


def keep_verdicts(scores: pd.DataFrame, columns: Sequence[str] = ("keep",)) -> pd.Series:
    """Boolean keep verdict per image_id: the AND of ``columns`` (e.g. ``("A_keep", "B_keep")``). Error
    rows (``status == "error"``) and null verdicts count as rejected."""
    absent = [c for c in columns if c not in scores.columns]
    if absent:
        raise ValueError(f"SCORES table has no column(s) {absent}; it has {list(scores.columns)[:20]}")
    keep = np.ones(len(scores), dtype=bool)
    for column in columns:
        keep &= scores[column].fillna(False).astype(bool).to_numpy()
    if "status" in scores.columns:
        keep &= (scores["status"] == "ok").to_numpy()
    return pd.Series(keep, index=scores["image_id"].to_numpy(), name="+".join(columns))


def _score_suffix(column: str) -> str | None:
    """The longest ``SCORE_SUFFIXES`` key ``column`` ends with, or None."""
    return next((s for s in sorted(SCORE_SUFFIXES, key=len, reverse=True) if column.endswith(s)), None)


def direction_of(column: str) -> bool | None:
    """True if larger is worse, False if smaller is worse, None when the column is not a known score."""
    suffix = _score_suffix(column)
    return SCORE_SUFFIXES[suffix][0] if suffix else None


def unit_of(column: str) -> str:
    """The unit of a known score column ("" for other columns)."""
    suffix = _score_suffix(column)
    return SCORE_SUFFIXES[suffix][1] if suffix else ""


# ---- statistics ---------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def binary_stats(failed: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Counts, precision / recall / F1 of rejecting failures, and the kept fraction.

    Args:
        failed: (N,) bool, True for an image with a failure (the positive class).
        rejected: (N,) bool, True when the filter rejects the image.
    """
    failed, rejected = np.asarray(failed, dtype=bool), np.asarray(rejected, dtype=bool)
    if failed.shape != rejected.shape:
        raise ValueError(f"failed {failed.shape} and rejected {rejected.shape} differ in shape")
    tp = int(np.sum(failed & rejected))
    fp = int(np.sum(~failed & rejected))
    fn = int(np.sum(failed & ~rejected))
    tn = int(np.sum(~failed & ~rejected))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    if math.isnan(recall):
        f1 = math.nan
    elif tp == 0:
        f1 = 0.0
    else:
        f1 = 2.0 * precision * recall / (precision + recall)
    n = tp + fp + fn + tn
    return {
        "n": n, "n_failed": tp + fn, "n_faithful": fp + tn, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": precision, "recall": recall, "f1": f1,
        "kept_fraction": _ratio(fn + tn, n), "kept_failure_share": _ratio(fn, fn + tn),
    }  # fmt: skip


def auroc(failed: np.ndarray, values: np.ndarray, higher_is_worse: bool = True) -> float:
    """Area under the ROC curve of ``values`` (N,) separating failed (True) from faithful images.

    NaN values (unscorable images) rank as the most suspicious. NaN when a class is empty or every value
    is NaN. 0.5 = chance, 1 = every failure scores worse than every faithful image.
    """
    from sklearn.metrics import roc_auc_score

    failed = np.asarray(failed, dtype=bool)
    oriented = _oriented(values, higher_is_worse)
    if oriented is None or failed.all() or not failed.any():
        return math.nan
    return float(roc_auc_score(failed, oriented))


def _oriented(values: np.ndarray, higher_is_worse: bool) -> np.ndarray | None:
    """(N,) scores where larger = worse, NaN replaced by one more than the worst finite value."""
    values = np.asarray(values, dtype=float)
    oriented = values if higher_is_worse else -values
    finite = np.isfinite(oriented)
    if not finite.any():
        return None
    return np.where(finite, oriented, oriented[finite].max() + 1.0)


def subset_members(subset: str) -> tuple[str, ...]:
    """The failure types a (non-``all``) subset holds: a pooled group's types, else the type itself."""
    return POOLED.get(subset, (subset,))


def subset_masks(
    labels: pd.DataFrame, min_effect: float | None = None, types: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Subset name -> (N,) bool row mask over ``labels`` (module docstring): ``all``, each failure type
    (given ``types``, else every type present), then each POOLED group with a type among them. Failures
    below ``min_effect`` are left out."""
    kinds = labels["injected_failure"].to_numpy()
    faithful = kinds == FAITHFUL
    big = np.ones(len(labels), dtype=bool)
    if min_effect is not None:
        big = labels["failure_effect"].to_numpy(dtype=float) >= min_effect
    wanted = sorted(set(kinds) - {FAITHFUL}) if types is None else [t for t in types if t != FAITHFUL]
    masks = {ALL: faithful | (~faithful & big)}
    for kind in wanted:
        masks[kind] = faithful | ((kinds == kind) & big)
    for group, members in POOLED.items():
        if set(members) & set(wanted):
            masks[group] = faithful | (np.isin(kinds, [m for m in members if m in wanted]) & big)
    return masks


@dataclass
class FilterRun:
    """One filter's output on a labelled batch.

    keep: bool per image_id (True = kept). scores: continuous score columns (image_id index) to report
    AUROC for, e.g. ``{"A_pck": ...}``. seconds: wall time of the filter on the batch (None = not timed).
    """

    name: str
    keep: pd.Series
    scores: dict[str, pd.Series] = field(default_factory=dict)
    seconds: float | None = None
    note: str = ""


def evaluate_filters(
    labels: pd.DataFrame, runs: Sequence[FilterRun], min_effect: float | None = None
) -> pd.DataFrame:
    """One row per (filter, subset): counts, precision, recall, F1, kept fraction, ``n_excluded`` (failures
    left out for a small effect), ``min_effect``; plus seconds and seconds per image of the filter."""
    labels = check_labels(labels)
    failed = labels["injected_failure"].to_numpy() != FAITHFUL
    kinds = labels["injected_failure"].to_numpy()
    excluded = ~subset_masks(labels, min_effect)[ALL]
    rows = []
    for run in runs:
        rejected = ~aligned(labels, run.keep, f"filter {run.name}").astype(bool)
        for subset, mask in subset_masks(labels, min_effect).items():
            dropped = excluded if subset == ALL else excluded & np.isin(kinds, subset_members(subset))
            row = {"filter": run.name, "subset": subset, "min_effect": min_effect}
            row.update(binary_stats(failed[mask], rejected[mask]))
            row["n_excluded"] = int(np.sum(dropped))
            row["seconds"] = run.seconds
            row["seconds_per_image"] = None if run.seconds is None else run.seconds / max(len(labels), 1)
            rows.append(row)
    return pd.DataFrame(rows)


def evaluate_scores(
    labels: pd.DataFrame, runs: Sequence[FilterRun], min_effect: float | None = None
) -> pd.DataFrame:
    """One row per (filter, score column, subset): AUROC and the class sizes it was computed on."""
    labels = check_labels(labels)
    failed = labels["injected_failure"].to_numpy() != FAITHFUL
    rows = []
    for run in runs:
        for column, series in run.scores.items():
            direction = direction_of(column)
            if direction is None:
                raise ValueError(f"score column {column!r} has no known direction (see SCORE_SUFFIXES)")
            values = aligned(labels, series, f"score {column}").astype(float)
            for subset, mask in subset_masks(labels, min_effect).items():
                rows.append(
                    {
                        "filter": run.name, "score": column, "subset": subset, "min_effect": min_effect,
                        "auroc": auroc(failed[mask], values[mask], direction),
                        "n_failed": int(np.sum(failed[mask])), "n_faithful": int(np.sum(~failed[mask])),
                    }
                )  # fmt: skip
    return pd.DataFrame(rows)


# ---- intervals over seeds -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided ``confidence`` interval [low, high] (``method``)."""

    mean: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """``61.20 [58.10, 64.30]`` (the interval is ``n/a`` for fewer than two values)."""
        if not math.isfinite(self.low):
            return f"{self.mean:.{digits}f} [n/a]"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(
    values: Sequence[float],
    confidence: float = 0.95,
    method: str = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean and ``confidence`` interval of ``values`` (e.g. one mIoU per seed).

    method ``t``: Student's t interval, mean +- t_{(1+c)/2, n-1} s / sqrt(n) (exact for normal values; the
    right choice for 3-5 seeds). method ``bootstrap``: percentile interval of ``n_boot`` resampled means
    (seeded; too narrow for very few values). Fewer than two values give NaN bounds.
    """
    x = np.asarray([v for v in values], dtype=float)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"mean_interval needs a non-empty list of finite numbers, got {values!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, len(x), method, confidence)
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
        return Interval(mean, mean - half, mean + half, len(x), method, confidence)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
        lo, hi = np.quantile(means, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
        return Interval(mean, float(lo), float(hi), len(x), method, confidence)
    raise ValueError(f"unknown interval method {method!r}; use 't' or 'bootstrap'")


# ---- writers ------------------------------------------------------------------------------------------
def json_ready(obj: Any) -> Any:
    """Plain JSON values: NaN / inf -> None, numpy scalars -> Python, DataFrames -> lists of records."""
    if isinstance(obj, pd.DataFrame):
        return [json_ready(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN written as null), atomically."""
    from prf.data.io import atomic_write_bytes

    text = json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_result(result: Any, out: Path | None, quick: bool, default: Path) -> Path | None:
    """Write a benchmark's JSON result to ``out`` when given, else to ``default`` unless it is a
    ``--quick`` run (smoke runs leave results/ alone); creates the folder. The path written, or None."""
    path = out or (None if quick else default)
    if path is None:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, result)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: NaN / None -> ``-``, floats with ``digits`` decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], digits: int = 3
) -> str:
    """A GitHub markdown table of ``rows``; ``columns``: (key, header) pairs in order."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(k), digits) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


def machine() -> dict[str, Any]:
    """Where a benchmark ran: platform, CPU count, torch version and threads, GPU name if any."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "gpu": gpu,
    }  # fmt: skip


# ---- plots --------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(
    labels: pd.DataFrame, runs: Sequence[FilterRun], path: str | os.PathLike[str], min_effect: float | None
) -> Path:
    """ROC curves of every score of every run, one panel per subset (``all`` and each failure type)."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    labels = check_labels(labels)
    failed = labels["injected_failure"].to_numpy() != FAITHFUL
    masks = subset_masks(labels, min_effect)
    cols = min(4, len(masks))
    rows = math.ceil(len(masks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (subset, mask) in zip(axes.flat, masks.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        for k, run in enumerate(runs):
            style = ("-", "--", "-.", ":")[k % 4]
            for column, series in run.scores.items():
                oriented = _oriented(
                    aligned(labels, series, column).astype(float), bool(direction_of(column))
                )
                if oriented is None or failed[mask].all() or not failed[mask].any():
                    continue
                fpr, tpr, _ = roc_curve(failed[mask], oriented[mask])
                area = auroc(failed[mask], oriented[mask], True)
                ax.plot(fpr, tpr, linestyle=style, linewidth=1.2, label=f"{column} ({area:.2f})")
        ax.set_title(f"{subset} (n failed {int(failed[mask].sum())})", fontsize=9)
        ax.set_xlabel("false alarm rate (faithful rejected)", fontsize=8)
        ax.set_ylabel("failures rejected", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(masks) :]:
        ax.axis("off")
    effect = "" if min_effect is None else f", failures with effect >= {min_effect:g} sqrt(A)"
    fig.suptitle(f"ROC of each score (AUROC in brackets{effect})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_distributions(
    labels: pd.DataFrame, runs: Sequence[FilterRun], path: str | os.PathLike[str], min_effect: float | None
) -> Path:
    """Histograms of every score: faithful images against failed ones (above ``min_effect``)."""
    plt = _pyplot()
    labels = check_labels(labels)
    failed = labels["injected_failure"].to_numpy() != FAITHFUL
    mask = subset_masks(labels, min_effect)[ALL]
    columns = [(column, series) for run in runs for column, series in run.scores.items()]
    if not columns:
        raise ValueError("no score columns to plot")
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax, (column, series) in zip(axes.flat, columns, strict=False):
        values = aligned(labels, series, column).astype(float)
        finite = np.isfinite(values) & mask
        if finite.any():
            bins = np.histogram_bin_edges(values[finite], bins=30)
            for group, name, colour in ((~failed, "faithful", "tab:blue"), (failed, "failed", "tab:red")):
                chosen = values[finite & group]
                if len(chosen):
                    ax.hist(chosen, bins=bins, alpha=0.55, color=colour, label=f"{name} ({len(chosen)})")
        unit = unit_of(column)
        ax.set_title(f"{column} ({unit})" if unit else column, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
