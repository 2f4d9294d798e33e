"""The binned rigid-pose classifier of KCF (3D-DST): a timm backbone, global average pooling and three
linear heads (azimuth, elevation, in-plane theta) of NB = 41 bins each, trained with cross-entropy.

Legend: B batch, S input side (pixels), C backbone channels, NB bins per head. Angles in radians.

Per-image KCF score (3D-DST's): the SUM over the three heads of the cross-entropy of the held-out image's
annotated bins. The training loss is the MEAN over heads and images (as 3D-DST's trainer). Scoring runs the
network in eval mode (3D-DST's script computes the score with BatchNorm in train mode, i.e. with batch
statistics; eval mode makes a score independent of the other images in its batch).
The geodesic error is the angle between the rotation of the predicted bins' centres and the annotated
(unbinned) rotation, both built with ``prf.geometry.look_at`` (``prf.metrics.rotation_geodesic``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from kcf.data import HEADS, AngleBins, rotation_from_angles
from prf.metrics import rotation_geodesic
from prf.models.backbone import Backbone, build_backbone


class ModelSettings(BaseModel):
    """Classifier: timm ``backbone`` at feature level ``out_index``, input side ``input_size`` pixels,
    optional local ImageNet weights ``pretrained_path`` (never downloaded), dropout before the heads."""

    model_config = ConfigDict(extra="forbid")
    backbone: str = "regnetx_002"
    out_index: int = -2
    pretrained_path: str | None = None
    input_size: int = Field(96, ge=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class BinSettings(BaseModel):
    """Bins per head and the elevation / theta ranges they cover (DEGREES; azimuth always [0, 360))."""

    model_config = ConfigDict(extra="forbid")
    num_bins: int = Field(41, ge=2)
    elevation_range_deg: tuple[float, float] = (-180.0, 180.0)
    theta_range_deg: tuple[float, float] = (-180.0, 180.0)

    def angle_bins(self) -> AngleBins:
        """The AngleBins (radians) these settings describe."""
        lo, hi = (math.radians(v) for v in self.elevation_range_deg)
        t_lo, t_hi = (math.radians(v) for v in self.theta_range_deg)
        return AngleBins(self.num_bins, (lo, hi), (t_lo, t_hi))


class OptimSettings(BaseModel):
    """The optimiser and a step decay of the learning rate every ``step_size`` epochs.

    ``name``: "sgd" (with ``momentum``; 3D-DST's, for an ImageNet-initialised ResNet-50) or "adamw"
    (``momentum`` unused): the CPU default's small backbone trains from scratch in a few epochs, where SGD
    leaves the azimuth head at chance (docs/kcf.md).
    """

    model_config = ConfigDict(extra="forbid")
    # the CPU defaults (kcf/configs/kcf_default.yaml), so a config file that leaves these out gets them
    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(0.001, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    step_size: int = Field(50, ge=1)
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class PoseClassifierNet(nn.Module):
    """Backbone -> global average pool -> dropout -> three linear heads.

    Args:
        backbone: a ``prf.models.backbone.Backbone`` (its ``out_channels`` sizes the heads).
        num_bins: NB bins per head.
        dropout: dropout probability before the heads.
    """

    def __init__(self, backbone: Backbone, num_bins: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_bins = num_bins
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(backbone.out_channels, num_bins) for name in HEADS})

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, 3, NB) logits (heads in ``HEADS`` order)."""
        features = self.backbone(images).mean(dim=(2, 3))
        features = self.dropout(features)
        return torch.stack([self.heads[name](features) for name in HEADS], dim=1)


def build_pose_classifier(
    backbone: str,
    num_bins: int,
    out_index: int = -1,
    pretrained_path: str | None = None,
    dropout: float = 0.0,
) -> PoseClassifierNet:
    """A PoseClassifierNet on a timm backbone built by name (weights only from a local file)."""
    return PoseClassifierNet(build_backbone(backbone, pretrained_path, out_index), num_bins, dropout)


def head_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """(B, 3, NB) logits and (B, 3) int64 bins -> (B, 3) cross-entropy per head (nats)."""
    batch, heads, num_bins = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, num_bins).float(), target.reshape(-1), reduction="none")
    return ce.reshape(batch, heads)


def geodesic_error(pred_bins: Tensor, angles: Tensor, bins: AngleBins) -> Tensor:
    """(B, 3) predicted bins and (B, 3) annotated angles (radians) -> (B,) float64 geodesic error (radians,
    in [0, pi]) between the rotations of the predicted bin centres and of the annotation."""
    predicted = rotation_from_angles(bins.centres(pred_bins))
    annotated = rotation_from_angles(angles.detach().cpu().double().numpy())
    return rotation_geodesic(predicted, annotated)


class KCFModule(pl.LightningModule):
    """Trains a PoseClassifierNet on some folds and scores held-out images.

    Args:
        net: the classifier.
        bins: the angle binning (for decoding predictions in ``predict_step``).
        optim: SGD / StepLR settings.
    Batches are ``kcf.data.KCFDataset`` items; images with ``ok`` 0 (unreadable) are left out of the loss.
    """

    def __init__(self, net: PoseClassifierNet, bins: AngleBins, optim: OptimSettings) -> None:
        super().__init__()
        self.net = net
        self.bins = bins
        self.optim = optim

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, 3, NB) logits."""
        return self.net(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        ce = head_cross_entropy(self(batch["image"]), batch["target"])
        ok = batch["ok"].to(ce.dtype)
        loss = (ce.mean(dim=1) * ok).sum() / ok.sum().clamp_min(1.0)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=ce.shape[0])
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per image: index, ce (B, 3), pred_bins (B, 3), geodesic (B,) radians, ok, error."""
        logits = self(batch["image"])
        ce = head_cross_entropy(logits, batch["target"])
        pred_bins = logits.argmax(dim=2)
        return {
            "index": batch["index"].cpu(),
            "ce": ce.detach().cpu().double(),
            "pred_bins": pred_bins.cpu(),
            "geodesic": geodesic_error(pred_bins, batch["angles"], self.bins),
            "ok": batch["ok"].cpu(),
            "error": list(batch["error"]),
        }

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        optimizer: torch.optim.Optimizer
        if o.name == "adamw":
            optimizer = torch.optim.AdamW(self.net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.net.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
            )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
