"""``prf evaluate``: an exported regressor's PA-MPJPE, S-MPJPE ("mm") and PCK@0.1 / @0.15 on a dataset.

The numbers follow the training validation exactly (``prf.models.regressor.batch_metrics``): crops from
``prf.data.transforms.crop_image`` at the checkpoint's input size and crop scale, the crop cameras from
the annotations' intrinsics (for checkpoints trained with perspective projection), 3D targets in the camera
frame (``R @ keypoint_3d``), PCK in crop pixels with the sqrt(silhouette area) normaliser (bbox sqrt(w h)
when a sample has no mask). Means skip samples where a metric is undefined (no 3D, no visible keypoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from prf.body.smal import SMAL
from prf.data.datamodule import RegressorDataset, Rows, source_entries
from prf.models.regressor import VAL_METRICS, batch_metrics, pck_metrics
from prf.predictor import Predictor


def evaluate(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str],
    batch_size: int = 32,
    limit: int | None = None,
    rows: Rows = "faithful",
    smal: SMAL | None = None,
    num_workers: int = 0,
    device: str = "cpu",
    flip_test: bool | None = None,
) -> dict[str, Any]:
    """Evaluate an export on a BATCH folder or an Animal3D-format JSON.

    Args:
        checkpoint: ``export.pt`` from ``prf train``.
        data: a BATCH folder or an Animal3D-format JSON file.
        batch_size: crops per forward pass; limit: evaluate only the first ``limit`` samples.
        rows: for a BATCH, ``faithful`` (injected_failure == "none", default), ``failures`` or ``all``.
        smal: the body model (default built-in); must match the checkpoint's layout.
        num_workers: DataLoader workers; device: torch device.
        flip_test: average detected keypoints over the crop and its mirror (default: on for heads with a
            keypoint branch, as ``prf score`` does; False reproduces the training validation exactly).
    Returns:
        {"pa_mpjpe": mm, "s_mpjpe": mm, "pck_0.1": share, "pck_0.15": share (of the model's 2D keypoints,
         ``prf.predictor``), "pck_0.15_projected": share (of the projected SMAL keypoints),
         "count": images evaluated,
         "count_3d": images with 3D targets, "checkpoint": name, "sha256": hex, "data": path, "rows": rows}.
    """
    body = smal if smal is not None else SMAL.builtin()
    predictor = Predictor.from_checkpoint(checkpoint, smal=body, device=device, flip_test=flip_test)
    entries = source_entries(data, body.num_joints, rows)
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise ValueError(f"{data}: no samples to evaluate (rows={rows!r})")
    dataset = RegressorDataset(
        entries, predictor.input_size, body.joint_names, body.num_betas, None, crop_scale=predictor.crop_scale
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in (*VAL_METRICS, "pck_0.15_projected")}
    count_3d = 0
    with torch.no_grad():
        for batch in loader:
            prediction = predictor.predict(batch["image"], batch["crop_cam"], batch_size=batch_size)
            pred = {"keypoints_3d": prediction.keypoints_3d, "keypoints_2d": prediction.keypoints_2d}
            for name, per_sample in batch_metrics(pred, batch, predictor.input_size).items():
                values[name].append(per_sample)
            projected = pck_metrics(prediction.keypoints_2d_projected, batch, predictor.input_size)
            values["pck_0.15_projected"].append(projected["pck_0.15"])
            count_3d += int((batch["has_3d"] > 0).sum())
    result: dict[str, Any] = {}
    for name, chunks in values.items():
        merged = torch.cat(chunks)
        finite = merged[torch.isfinite(merged)]
        result[name] = float(finite.mean()) if finite.numel() else float("nan")
    result.update(
        count=len(dataset),
        count_3d=count_3d,
        checkpoint=predictor.name,
        sha256=predictor.sha256,
        data=str(Path(data)),
        rows=rows,
        flip_test=predictor.flip_test,
    )
    return result


def format_result(result: dict[str, Any]) -> str:
    """One line: ``PA-MPJPE 85.1 mm  S-MPJPE 190.3 mm  PCK@0.1 92.0%  PCK@0.15 96.5%  (n=500)``."""
    return (
        f"PA-MPJPE {result['pa_mpjpe']:.1f} mm  S-MPJPE {result['s_mpjpe']:.1f} mm  "
        f"PCK@0.1 {100 * result['pck_0.1']:.1f}%  PCK@0.15 {100 * result['pck_0.15']:.1f}%  "
        f"(projected SMAL {100 * result.get('pck_0.15_projected', float('nan')):.1f}%)  "
        f"(n={result['count']})"
    )
