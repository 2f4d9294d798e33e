"""Inference with an exported regressor: what ``prf score`` and ``prf evaluate`` use.

Legend: B batch, S crop side (``Predictor.input_size``), K = 26 keypoints, J joints, NB betas.

Conventions (one definition, shared with training in ``prf.models.regressor.run_regressor``):

- Input: crops made by ``prf.data.transforms.crop_image`` (square box ``crop_scale * max(w, h)`` around
  the bbox, resized to S x S) and normalised as ``(x / 255 - mean) / std`` with the checkpoint's
  ``normalisation`` (ImageNet's). ``Predictor.prepare`` does both for one image.
- The global orientation (``pose_rotmat[:, 0]``) is in the CAMERA frame (OpenCV axes: x right, y down,
  z forward); the other joints are local rotations, as in the SMAL file.
- SMAL is posed with the predicted betas and rotations and ``trans = 0``; ``keypoints_3d`` are relative to
  the root joint, metres, camera-aligned. Compare them with an annotation's ``R @ keypoint_3d`` (R the
  camera rotation, I for Animal3D) through translation-free metrics (PA-MPJPE, S-MPJPE).
- 2D keypoints: weak perspective ``n = s * (X_xy + [tx, ty])`` with ``cam = [s, tx, ty]`` gives normalised
  crop coordinates in [-1, 1]; ``keypoints_2d_crop = (n + 1) * S / 2 - 0.5`` are crop pixels (pixel centres
  at integers, as cv2), i.e. ``(n + 1) / 2 * S`` from the crop's left/top edge. Map them back to image
  pixels with the inverse of the crop affine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prf.body.smal import SMAL
from prf.checkpoint import build_net_from_export, check_layout, load_export, sha256_file
from prf.data.transforms import crop_image, from_normalised, normalise_image
from prf.models.regressor import keypoint_only_smal, run_regressor


@dataclass
class Prediction:
    """Regressor outputs for B crops (CPU tensors; see the module docstring for frames and units).

    Attributes:
        pose_rotmat: (B, J, 3, 3) rotations, joint 0 global in the camera frame.
        betas: (B, NB) shape coefficients.
        cam: (B, 3) weak-perspective [s, tx, ty].
        keypoints_3d: (B, 26, 3) metres, root-relative, camera-aligned.
        keypoints_2d_crop: (B, 26, 2) crop pixels.
    """

    pose_rotmat: Tensor
    betas: Tensor
    cam: Tensor
    keypoints_3d: Tensor
    keypoints_2d_crop: Tensor

    def __len__(self) -> int:
        return int(self.cam.shape[0])


class Predictor:
    """An exported regressor ready for inference. Build it with ``Predictor.from_checkpoint``.

    Attributes:
        input_size: S; crop_scale: box side / max(w, h); mean, std: normalisation.
        sha256: hex digest of the checkpoint file; name: a short name (e.g. "synthetic-pare");
        stage, arch, backbone: from the export; export_metrics: its final validation metrics;
        smal_layout: the layout it was trained for.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        body: SMAL,
        export: dict[str, Any],
        sha256: str,
        name: str,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.body = body.to(self.device).eval()
        self.input_size = int(export["input_size"])
        self.crop_scale = float(export["crop_scale"])
        self.mean = tuple(float(v) for v in export["normalisation"]["mean"])
        self.std = tuple(float(v) for v in export["normalisation"]["std"])
        self.sha256 = sha256
        self.name = name
        self.stage = str(export["stage"])
        self.arch = str(export["arch"])
        self.backbone = str(export["backbone"])
        self.export_metrics: dict[str, float] = dict(export.get("metrics") or {})
        self.smal_layout: dict[str, Any] = dict(export["smal_layout"])

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], smal: SMAL | None = None, device: str | torch.device = "cpu"
    ) -> Predictor:
        """Load an export (weights_only; sha256 checked when the ``.sha256`` sidecar exists), rebuild the
        net, and pair it with ``smal`` (default: the built-in quadruped).

        Raises:
            LayoutMismatchError: the checkpoint was trained for another SMAL layout (names both).
        """
        path = Path(path)
        export = load_export(path)
        body_model = smal if smal is not None else SMAL.builtin()
        check_layout(export["smal_layout"], body_model.layout_signature(), f"checkpoint {path}")
        net = build_net_from_export(export)
        name = str(export.get("name") or path.stem)
        return cls(net, keypoint_only_smal(body_model), export, sha256_file(path), name, device)

    def prepare(self, image: np.ndarray, bbox: np.ndarray | list[float]) -> tuple[Tensor, np.ndarray]:
        """One image -> its normalised crop (3, S, S) float32 and the (2, 3) image -> crop affine."""
        crop, affine = crop_image(image, bbox, self.input_size, self.crop_scale)
        return normalise_image(crop, self.mean, self.std), affine

    @torch.no_grad()
    def predict(self, crops: Tensor, batch_size: int = 64) -> Prediction:
        """(B, 3, S, S) normalised crops -> Prediction, in chunks of ``batch_size`` (no gradients)."""
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"expected crops of shape (B, 3, {self.input_size}, {self.input_size}) (normalised, see "
                f"Predictor.prepare), got {tuple(crops.shape)}"
            )
        parts: list[dict[str, Tensor]] = []
        for start in range(0, crops.shape[0], batch_size):
            chunk = crops[start : start + batch_size].to(self.device, torch.float32)
            out = run_regressor(self.net, self.body, chunk)
            parts.append({k: v.cpu() for k, v in out.items() if v is not None and k != "part_logits"})
        if not parts:
            raise ValueError("predict() got an empty batch of crops")
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return Prediction(
            pose_rotmat=merged["pose"],
            betas=merged["betas"],
            cam=merged["cam"],
            keypoints_3d=merged["keypoints_3d"],
            keypoints_2d_crop=from_normalised(merged["keypoints_2d"], self.input_size),
        )
