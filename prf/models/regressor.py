"""The regressor LightningModule: a PoseRegressorNet (PARE or HMR head) with the SMAL layer in the loop.

Legend: B batch, S crop side, K = 26 keypoints, J joints, NB betas.

Prediction convention (shared with ``prf.predictor``): SMAL is posed with the predicted betas and rotations
(joint 0 = global orientation in the camera frame, OpenCV axes) and ``trans = 0``; the 3D keypoints are
taken relative to the root joint (metres, camera-aligned). 2D keypoints come from ``project_keypoints``:
with the crop's pinhole camera known (``crop_cam = [f, px, py]`` in crop pixels) a perspective projection
whose camera ``[s, tx, ty]`` reduces to weak perspective ``n = s * (X_xy + [tx, ty])`` for points at the
root's depth; without it, weak perspective itself (``prf.geometry.project_weak_perspective``). Normalised
crop coordinates n lie in [-1, 1]; crop pixels are ``(n + 1) * S / 2 - 0.5`` (pixel centres at integers).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torchmetrics
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from prf import metrics
from prf.body.smal import SMAL
from prf.checkpoint import check_layout
from prf.data.transforms import from_normalised
from prf.models.inference import (  # noqa: F401  (re-exported: the regressor's public API)
    DENSE_OUTPUTS,
    image_keypoints,
    keypoint_only_smal,
    project_keypoints,
    run_regressor,
)
from prf.models.losses import LossConfig, RegressorLoss, fit_weak_camera

LAYOUT_KEY = "prf_smal_layout"
VAL_METRICS = ("pa_mpjpe", "s_mpjpe", "pck_0.1", "pck_0.15")


class OptimConfig(BaseModel):
    """Optimiser and schedule: Adam / AdamW, a linear warm-up, then cosine decay to ``min_lr_ratio * lr``
    over the run's steps, or a step decay (``gamma`` every ``step_epochs``), or a constant rate."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "step", "none"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    step_epochs: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)


def batch_metrics(
    pred: dict[str, Tensor | None], batch: dict[str, Tensor], input_size: int
) -> dict[str, Tensor]:
    """Per-sample PA-MPJPE and S-MPJPE ("mm", rows without 3D are NaN) and PCK@0.1 / @0.15 (crop pixels,
    sqrt-mask-area normaliser, on ``image_keypoints``), each (B,)."""
    pred3d = pred["keypoints_3d"].detach().double() * 1000.0
    target3d = batch["kp3d"].double() * 1000.0
    no_3d = batch["has_3d"] <= 0
    nan = torch.full_like(pred3d[:, 0, 0], float("nan"))
    out = {
        "pa_mpjpe": torch.where(no_3d, nan, metrics.pa_mpjpe(pred3d, target3d)),
        "s_mpjpe": torch.where(no_3d, nan, metrics.s_mpjpe(pred3d, target3d)),
    }
    return {**out, **pck_metrics(image_keypoints(pred), batch, input_size)}


def pck_metrics(keypoints_2d: Tensor, batch: dict[str, Tensor], input_size: int) -> dict[str, Tensor]:
    """Per-sample PCK@0.1 / @0.15, each (B,), of (B, K, 2) normalised crop keypoints against the batch's
    ``kp2d`` (crop pixels, sqrt-mask-area normaliser ``mask_norm``, visible keypoints only)."""
    pred2d = from_normalised(keypoints_2d.detach().double(), input_size)
    target2d = from_normalised(batch["kp2d"].double(), input_size)
    norm = batch["mask_norm"].double()
    return {f"pck_{alpha}": metrics.pck(pred2d, target2d, batch["vis"], alpha, norm) for alpha in (0.1, 0.15)}


class RegressorModule(pl.LightningModule):
    """LightningModule around a built PoseRegressorNet and a SMAL layer.

    Args:
        net: the PoseRegressorNet (``prf.models.heads.build_regressor_net``).
        smal: the body model the data was made with (built-in or a SMAL file); its layout is recorded in
            every checkpoint, and a checkpoint for another layout is refused on load.
        loss: loss weights; optim: optimiser and schedule.
        input_size: crop side S in pixels (for PCK in crop pixels).
        projection: "perspective" (use each batch's ``crop_cam``, see ``project_keypoints``) or "weak".
        hparams: extra plain-typed values saved with the checkpoint's hyper-parameters (e.g. the config).
    """

    def __init__(
        self,
        net: nn.Module,
        smal: SMAL,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        input_size: int = 128,
        projection: Literal["perspective", "weak"] = "perspective",
        hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if projection not in ("perspective", "weak"):
            raise ValueError(f"projection must be 'perspective' or 'weak', got {projection!r}")
        self.projection = projection
        self.net = net
        self.smal_layout = smal.layout_signature()
        self.body = keypoint_only_smal(smal)
        self.loss_config = loss or LossConfig()
        self.optim_config = optim or OptimConfig()
        self.input_size = input_size
        self.criterion = RegressorLoss(self.loss_config, smal.joint_names)
        self.save_hyperparameters(
            {
                "loss": self.loss_config.model_dump(),
                "optim": self.optim_config.model_dump(),
                "input_size": input_size,
                "projection": projection,
                **(hparams or {}),
            }
        )
        self.eval_metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict(
                    {name.replace(".", "_"): torchmetrics.MeanMetric() for name in VAL_METRICS}
                )
                for stage in ("val", "test")
            }
        )

    def forward(self, images: Tensor, crop_cam: Tensor | None = None) -> dict[str, Tensor | None]:
        """(B, 3, S, S) normalised crops (+ (B, 3) crop cameras) -> ``run_regressor`` outputs."""
        return run_regressor(
            self.net, self.body, images, crop_cam if self.projection == "perspective" else None
        )

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        pred = self(batch["image"], batch.get("crop_cam"))
        if pred["attention"] is not None and self.loss_config.joint_attention > 0:
            batch = {**batch, **self.joint_targets(batch)}
        total, terms = self.criterion(pred, batch)
        size = batch["image"].shape[0]
        on_step = stage == "train"
        # sync_dist: under DDP the logged means cover every rank's images (the metrics below are
        # torchmetrics, synced already); one scalar all-reduce per step beside DDP's gradient all-reduce
        self.log(
            f"{stage}/loss", total.detach(), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size,
            sync_dist=True,
        )  # fmt: skip
        for name, value in terms.items():
            self.log(
                f"{stage}/loss_{name}", value, on_step=False, on_epoch=True, batch_size=size, sync_dist=True
            )
        if stage in self.eval_metrics:
            for name, values in batch_metrics(pred, batch, self.input_size).items():
                metric = self.eval_metrics[stage][name.replace(".", "_")]
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    metric.update(finite.float())
                self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "pck_0.15")
        return total

    @torch.no_grad()
    def joint_targets(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """2D joint targets for the attention loss: SMAL posed with the target pose and betas, projected with
        the weak-perspective camera fitted to the visible 2D keypoints. Returns ``joints_2d`` (B, J, 2)
        normalised and ``joints_2d_ok`` (B,) float."""
        posed = self.body(betas=batch["betas"], pose=batch["pose"])
        root = posed.joints[:, :1]
        s, u, ok = fit_weak_camera(posed.keypoints - root, batch["kp2d"], batch["vis"])
        joints_2d = s[:, None, None] * (posed.joints - root)[..., :2] + u[:, None]
        return {"joints_2d": joints_2d, "joints_2d_ok": ok.to(joints_2d.dtype)}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> dict[str, Tensor]:
        """A batch (dict with ``image`` and optionally ``crop_cam``, or a (B, 3, S, S) tensor) -> CPU
        predictions (no part logits), with ``keypoints_2d_crop`` (B, K, 2) in crop pixels (of
        ``image_keypoints``) added."""
        images = batch["image"] if isinstance(batch, dict) else batch
        pred = self(images, batch.get("crop_cam") if isinstance(batch, dict) else None)
        out = {k: v.detach().cpu() for k, v in pred.items() if v is not None and k not in DENSE_OUTPUTS}
        out["keypoints_2d_crop"] = from_normalised(image_keypoints(out), self.input_size)
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_config
        params = [p for p in self.parameters() if p.requires_grad]
        optim_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        optimizer = optim_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_epochs, gamma=cfg.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        lr_lambda = _warmup_cosine(cfg.warmup_steps, total, cfg.min_lr_ratio, cfg.schedule == "cosine")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[LAYOUT_KEY] = self.smal_layout

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained = checkpoint.get(LAYOUT_KEY)
        if trained is None:
            raise ValueError("this Lightning checkpoint records no SMAL layout: it was not written by prf")
        check_layout(trained, self.smal_layout, "the checkpoint")


def _warmup_cosine(warmup: int, total: int, min_ratio: float, cosine: bool):
    """LR factor per step: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` (or flat)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
