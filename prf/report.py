"""``prf report``: an HTML page (with PNGs) about one SCORES file.

It shows the verdict counts, reject reasons and per-model agreement (``prf.score_io.summarize``), each
metric's distribution per model with that model's threshold, and contact sheets of kept and rejected
images with the annotated keypoints (green) and each model's predicted keypoints (red) drawn on them, one
tile per model, like the paper's figure comparing filter decisions. Error rows are listed with their reason.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from prf.body.layout import NUM_KEYPOINTS
from prf.data.io import ImageReadError, atomic_write_bytes, read_image_rgb, write_png
from prf.score_io import read_provenance, read_thresholds_of, summarize
from prf.thresholds import METRICS, ThresholdsConfig
from prf.viz import draw_keypoints, fit, grid, label

ANNOTATION_COLOUR = (40, 200, 60)
PREDICTION_COLOUR = (235, 50, 50)
MODEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
MAX_ERRORS_LISTED = 100


def _metric_plot(table: pd.DataFrame, config: ThresholdsConfig, metric: str, path: Path) -> Path:
    """Histogram of ``metric`` per model (scored rows) with each model's threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 3.6))
    ok = table["status"] == "ok"
    per_model = {}
    for name in config.models:
        values = table.loc[ok, f"{name}_{metric}"].to_numpy(dtype=float)
        per_model[name] = values[np.isfinite(values)]
    pooled = np.concatenate(list(per_model.values()))
    low, high = (pooled.min(), pooled.max()) if pooled.size else (0.0, 1.0)
    bins = np.linspace(low, high, 41) if high > low else np.linspace(low - 0.5, high + 0.5, 41)
    for k, name in enumerate(config.models):
        colour = MODEL_COLOURS[k % len(MODEL_COLOURS)]
        values = per_model[name]
        if values.size:
            axis.hist(values, bins=bins, alpha=0.5, color=colour, label=f"{name} (n={values.size})")
        for check in config.models[name].checks():
            if check.metric == metric:
                axis.axvline(
                    check.limit,
                    color=colour,
                    linestyle="--",
                    label=f"{name} threshold {check.op} {check.limit:g}",
                )
    unit = METRICS[metric][2]
    axis.set(xlabel=f"{metric} ({unit})", ylabel="images", title=f"{metric} per model")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _points(values: Any, columns: int) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    return array.reshape(NUM_KEYPOINTS, columns) if array.size == NUM_KEYPOINTS * columns else None


def _tile(row: dict[str, Any], name: str, size: int) -> np.ndarray:
    """One image with the annotation (green) and model ``name``'s prediction (red), size x size."""
    try:
        image = read_image_rgb(row["image"])
    except (ImageReadError, OSError):
        return label(np.full((size, size, 3), 90, dtype=np.uint8), f"{row['image_id']}: unreadable")
    scale = size / max(image.shape[:2])
    resized = cv2.resize(
        image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    )
    annotated, predicted = _points(row["keypoints_2d"], 3), _points(row[f"{name}_keypoints_2d"], 2)
    for points, colour in ((annotated, ANNOTATION_COLOUR), (predicted, PREDICTION_COLOUR)):
        if points is not None:
            points = points.copy()
            points[:, :2] = (points[:, :2] + 0.5) * scale - 0.5  # pixel centres at integers
            resized = draw_keypoints(resized, points, colour=colour, radius=2)
    verdict = "keep" if row[f"{name}_keep"] else "reject"
    return label(fit(resized, size), f"{row['image_id']} {name}: {verdict}")


def _contact_sheet(
    scores: Path, rows: pd.DataFrame, names: list[str], path: Path, count: int, size: int
) -> int:
    """Up to ``count`` rows (evenly spread) as a sheet, one tile per model per image; returns images shown."""
    if rows.empty:
        return 0
    picks = rows.iloc[np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int))]
    ids = list(picks["image_id"])
    columns = ["image_id", "image", "keypoints_2d"] + [
        f"{n}_{c}" for n in names for c in ("keypoints_2d", "keep")
    ]
    detail = pq.read_table(scores, columns=columns, filters=[("image_id", "in", ids)]).to_pandas()
    by_id = {r["image_id"]: r for r in detail.to_dict("records")}
    tiles = [_tile(by_id[i], name, size) for i in ids for name in names]
    per_row = max(1, 8 // len(names)) * len(names)
    write_png(path, grid(tiles, per_row))
    return len(ids)


def _table_html(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def report(
    scores: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    per_sheet: int = 24,
    tile: int = 160,
) -> Path:
    """Write ``<out>/index.html`` with metric plots and kept / rejected contact sheets; returns its path.

    Args:
        scores: a SCORES Parquet file from ``prf score``.
        out: folder to write (default ``<scores stem>_report`` beside the file).
        per_sheet: images per contact sheet; tile: tile side in pixels.
    """
    scores = Path(scores)
    if per_sheet < 1 or tile < 16:
        raise ValueError(f"--per-sheet must be >= 1 (got {per_sheet}) and the tile side >= 16 (got {tile})")
    if not scores.is_file():
        raise FileNotFoundError(f"SCORES file {scores} does not exist (make it with prf score)")
    folder = Path(out) if out is not None else scores.with_name(f"{scores.stem}_report")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; the report is a folder (index.html and its PNGs)")
    provenance = read_provenance(scores)
    config = read_thresholds_of(provenance)
    names = config.model_names()
    folder.mkdir(parents=True, exist_ok=True)
    present = set(pq.read_schema(scores).names)  # an older prf wrote fewer metric columns
    metric_columns = [f"{n}_{m}" for n in names for m in METRICS if f"{n}_{m}" in present]
    table = pq.read_table(
        scores, columns=["image_id", "status", "reason", "keep", *metric_columns]
    ).to_pandas()
    summary = summarize(scores, max_errors=0)

    # a metric no model computed (max_rel_kp_error without its thresholds) gets no plot
    shown_metrics = [
        m
        for m in METRICS
        if any(np.isfinite(table.get(f"{n}_{m}", pd.Series(dtype=float))).any() for n in names)
    ]
    plots = [_metric_plot(table, config, metric, folder / f"metric_{metric}.png") for metric in shown_metrics]
    ok = table[table["status"] == "ok"]
    shown = {
        which: _contact_sheet(scores, subset, names, folder / f"{which}.png", per_sheet, tile)
        for which, subset in (("kept", ok[ok["keep"]]), ("rejected", ok[~ok["keep"].astype(bool)]))
    }
    errors = table[table["status"] != "ok"].head(MAX_ERRORS_LISTED)

    counts = [("images", summary.total), ("kept", summary.kept), ("rejected", summary.rejected),
              ("errors", summary.errored)]  # fmt: skip
    failures = [(n, m, summary.limits[n][m], c) for n in names for m, c in summary.failures[n].items()]
    models = [(m["name"], m["checkpoint"], m["sha256"][:16]) for m in provenance["models"]]
    parts = [
        f"<h1>PRF scores: {html.escape(str(scores))}</h1>",
        f"<p>input {html.escape(str(provenance['input']))}; combine: <b>{config.combine}</b>; thresholds "
        f"sha256 {html.escape(provenance['thresholds']['sha256'][:16])}; "
        f"prf {html.escape(str(provenance.get('prf_version')))}</p>",
        _table_html([tuple(map(str, c)) for c in counts], ("", "images")),
        "<h2>Models</h2>",
        _table_html(models, ("model", "checkpoint", "sha256")),
        "<h2>Reject reasons (scored images failing each threshold)</h2>",
        _table_html(
            [tuple(map(str, f)) for f in failures], ("model", "metric", "threshold", "images failing")
        ),
        "<h2>Per-model agreement</h2>",
        _table_html([(k, str(v)) for k, v in summary.agreement.items()], ("verdicts", "images")),
        "<h2>Metric distributions</h2>",
        "".join(f'<img src="{p.name}" alt="{p.stem}">' for p in plots),
    ]
    for which in ("kept", "rejected"):
        parts.append(f"<h2>{which.capitalize()} images ({shown[which]} shown)</h2>")
        if shown[which]:
            parts.append(
                '<p><span style="color:#28c83c">green</span>: annotated keypoints; '
                '<span style="color:#eb3232">red</span>: the model\'s prediction (one tile per model).</p>'
                f'<img src="{which}.png" alt="{which} images">'
            )
        else:
            parts.append("<p>none</p>")
    parts.append(f"<h2>Errors ({summary.errored})</h2>")
    parts.append(_table_html([(r.image_id, r.reason) for r in errors.itertuples()], ("image_id", "reason")))
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%;margin:4px}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>PRF report</title><style>{style}</style>'
        f"</head><body>{''.join(parts)}</body></html>\n"
    )
    index = folder / "index.html"
    atomic_write_bytes(index, page.encode("utf-8"))
    return index
