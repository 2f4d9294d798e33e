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
- 2D keypoints: ``cam = [s, tx, ty]`` is a weak-perspective camera, ``n = s * (X_xy + [tx, ty])`` in
  normalised crop coordinates [-1, 1]. A checkpoint trained with ``projection: perspective`` (the default)
  projects through the crop's pinhole camera instead when it is given (``crop_cameras``, from the image
  intrinsics: ``Predictor.prepare(..., intrinsics=K)`` or ``prf.data.transforms.crop_camera``), which is
  what it was trained on; see ``prf.models.regressor.project_keypoints``. Without crop cameras it falls
  back to weak perspective (close, wide-angle views then lose a few PCK points).
  ``keypoints_2d_crop = (n + 1) * S / 2 - 0.5`` are crop pixels (pixel centres at integers, as cv2), i.e.
  ``(n + 1) / 2 * S`` from the crop's left/top edge; map them to image pixels with the inverse crop affine
  (``prf.geometry.invert_affine``).
- Which 2D keypoints: a head with a keypoint branch (PARE with ``num_keypoints``, the default checkpoints)
  reports its heatmaps' soft-argmax as ``keypoints_2d`` (what the network sees in the image); otherwise
  ``keypoints_2d`` is the SMAL projection. ``keypoints_2d_projected`` is always the projection. Detected
  keypoints are averaged over the crop and its mirror image (``flip_test``, on by default for such heads).
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
from prf.data.transforms import crop_camera, crop_image, from_normalised, normalise_image
from prf.models.inference import DENSE_OUTPUTS, image_keypoints, keypoint_only_smal, run_regressor

# run_regressor outputs that Prediction does not carry (keypoints_2d_image is the one it reports)
_SCORING_ONLY = ("keypoints_2d_detected", "keypoints_2d_flip_gap")


@dataclass
class Prediction:
    """Regressor outputs for B crops (CPU tensors; see the module docstring for frames and units).

    Attributes:
        pose_rotmat: (B, J, 3, 3) rotations, joint 0 global in the camera frame.
        betas: (B, NB) shape coefficients.
        cam: (B, 3) weak-perspective [s, tx, ty].
        keypoints_3d: (B, 26, 3) metres, root-relative, camera-aligned.
        keypoints_2d_crop: (B, 26, 2) the model's 2D keypoints (module docstring), crop pixels.
        keypoints_2d: (B, 26, 2) the same in normalised crop coordinates [-1, 1].
        keypoints_2d_projected: (B, 26, 2) the SMAL keypoints projected with ``cam``, normalised.
    """

    pose_rotmat: Tensor
    betas: Tensor
    cam: Tensor
    keypoints_3d: Tensor
    keypoints_2d_crop: Tensor
    keypoints_2d: Tensor
    keypoints_2d_projected: Tensor

    def __len__(self) -> int:
        return int(self.cam.shape[0])


class Predictor:
    """An exported regressor ready for inference. Build it with ``Predictor.from_checkpoint``.

    Attributes:
        input_size: S; crop_scale: box side / max(w, h); mean, std: normalisation.
        sha256: hex digest of the checkpoint file; name: a short name (e.g. "synthetic-pare");
        projection: "perspective" (uses crop cameras when given) or "weak";
        stage, arch, backbone: from the export; export_metrics: its final validation metrics;
        flip_test: whether detected keypoints are averaged with the mirrored crop's (module docstring);
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
        flip_test: bool | None = None,
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
        self.projection = str(export.get("projection", "weak"))
        self.export_metrics: dict[str, float] = dict(export.get("metrics") or {})
        self.smal_layout: dict[str, Any] = dict(export["smal_layout"])
        has_keypoints = bool(dict(export["net"].get("head_kwargs") or {}).get("num_keypoints"))
        self.flip_test = has_keypoints if flip_test is None else bool(flip_test) and has_keypoints

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        smal: SMAL | None = None,
        device: str | torch.device = "cpu",
        flip_test: bool | None = None,
    ) -> Predictor:
        """Load an export (weights_only; sha256 checked when the ``.sha256`` sidecar exists), rebuild the
        net, and pair it with ``smal`` (default: the built-in quadruped). ``flip_test`` (default: on for
        heads with a keypoint branch) averages the detected keypoints over the crop and its mirror image
        (``prf.models.regressor.run_regressor``).

        Raises:
            LayoutMismatchError: the checkpoint was trained for another SMAL layout (names both).
        """
        path = Path(path)
        export = load_export(path)
        body_model = smal if smal is not None else SMAL.builtin()
        check_layout(export["smal_layout"], body_model.layout_signature(), f"checkpoint {path}")
        net = build_net_from_export(export)
        name = str(export.get("name") or path.stem)
        return cls(net, keypoint_only_smal(body_model), export, sha256_file(path), name, device, flip_test)

    def prepare(
        self, image: np.ndarray, bbox: np.ndarray | list[float], intrinsics: np.ndarray | None = None
    ) -> tuple[Tensor, np.ndarray, Tensor | None]:
        """One image -> (normalised crop (3, S, S) float32, (2, 3) image -> crop affine, crop camera (3,)
        [f, px, py] in crop pixels from the (3, 3) ``intrinsics``, or None without them)."""
        crop, affine = crop_image(image, bbox, self.input_size, self.crop_scale)
        camera = None
        if intrinsics is not None:
            camera = torch.as_tensor(crop_camera(intrinsics, affine), dtype=torch.float32)
        return normalise_image(crop, self.mean, self.std), affine, camera

    @torch.no_grad()
    def predict(self, crops: Tensor, crop_cameras: Tensor | None = None, batch_size: int = 64) -> Prediction:
        """(B, 3, S, S) normalised crops (+ optional (B, 3) crop cameras [f, px, py], crop pixels) ->
        Prediction, in chunks of ``batch_size`` (no gradients). Crop cameras are ignored by a checkpoint
        trained with weak perspective."""
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"expected crops of shape (B, 3, {self.input_size}, {self.input_size}) (normalised, see "
                f"Predictor.prepare), got {tuple(crops.shape)}"
            )
        if crop_cameras is not None and tuple(crop_cameras.shape) != (crops.shape[0], 3):
            raise ValueError(
                f"crop_cameras must have shape ({crops.shape[0]}, 3), got {tuple(crop_cameras.shape)}"
            )
        use_cameras = crop_cameras is not None and self.projection == "perspective"
        parts: list[dict[str, Tensor]] = []
        for start in range(0, crops.shape[0], batch_size):
            chunk = crops[start : start + batch_size].to(self.device, torch.float32)
            cams = crop_cameras[start : start + batch_size].to(self.device) if use_cameras else None
            out = run_regressor(self.net, self.body, chunk, cams, self.flip_test)
            out["keypoints_2d_image"] = image_keypoints(out)
            parts.append(
                {
                    k: v.cpu()
                    for k, v in out.items()
                    if v is not None and k not in (*DENSE_OUTPUTS, *_SCORING_ONLY)
                }
            )
        if not parts:
            raise ValueError("predict() got an empty batch of crops")
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return Prediction(
            pose_rotmat=merged["pose"],
            betas=merged["betas"],
            cam=merged["cam"],
            keypoints_3d=merged["keypoints_3d"],
            keypoints_2d_crop=from_normalised(merged["keypoints_2d_image"], self.input_size),
            keypoints_2d=merged["keypoints_2d_image"],
            keypoints_2d_projected=merged["keypoints_2d"],
        )
