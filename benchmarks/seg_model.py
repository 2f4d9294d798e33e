"""The downstream part segmenter: a SegFormer trained on a filter's kept images, scored by per-part IoU.

Legend: N images, B batch, H, W image size (pixels), C = 5 coarse classes (``COARSE_PARTS``: background,
head, torso, leg, tail; prf.body.layout maps the BATCH's fine part masks onto them).

Labels come from the BATCH masks. For an image with an injected failure the mask is the INTENDED one
(generation/pipeline.py renders the mask from the intended state and the picture from the perturbed one),
so such an image teaches the segmenter a wrong label map: that is what a filter should remove.

The model is ``transformers.SegformerForSemanticSegmentation``: a tiny random-init config on the CPU by
default (``tiny_config``), or a local MiT folder (e.g. MiT-b5) given by path; nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prf.body.layout import COARSE_PARTS, FINE_PARTS, FINE_TO_COARSE
from prf.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = len(COARSE_PARTS)
_FINE_TO_COARSE = np.asarray(FINE_TO_COARSE, dtype=np.uint8)


def coarse_labels(fine: np.ndarray) -> np.ndarray:
    """(H, W) uint8 fine part labels (FINE_PARTS indices) -> (H, W) uint8 coarse labels (COARSE_PARTS)."""
    if fine.size and int(fine.max()) >= len(FINE_PARTS):
        raise ValueError(f"mask holds label {int(fine.max())}; fine labels are 0..{len(FINE_PARTS) - 1}")
    return _FINE_TO_COARSE[fine]


@dataclass
class SegData:
    """Images (N, 3, H, W) uint8 RGB and labels (N, H, W) uint8 coarse classes, with their image ids."""

    images: Tensor
    labels: Tensor
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, keep: np.ndarray) -> SegData:
        """The images where ``keep`` (N,) bool is True."""
        index = torch.as_tensor(np.flatnonzero(np.asarray(keep, dtype=bool)))
        return SegData(self.images[index], self.labels[index], [self.image_ids[i] for i in index.tolist()])


def load_seg_data(batch: str | os.PathLike[str], image_ids: list[str] | None = None) -> SegData:
    """Read a BATCH's images and coarse labels into memory (all images, or ``image_ids`` in that order)."""
    from prf.data.batch import BatchReader

    reader = BatchReader(batch)
    ids = reader.image_ids() if image_ids is None else list(image_ids)
    if not ids:
        raise ValueError(f"no images to load from {batch}")
    images, labels = [], []
    for image_id in ids:
        image, fine = reader.read_image(image_id), reader.read_mask(image_id)
        if fine.shape != image.shape[:2]:
            raise ValueError(f"{batch}: mask of {image_id} is {fine.shape}, image is {image.shape[:2]}")
        images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
        labels.append(torch.from_numpy(coarse_labels(fine)))
    return SegData(torch.stack(images), torch.stack(labels), ids)


def tiny_config(num_labels: int = NUM_CLASSES) -> Any:
    """A ~0.36 M-parameter SegFormer (hidden sizes 16-128, one block per stage) that trains on a CPU."""
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 1, 2, 4], mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=64, num_labels=num_labels, semantic_loss_ignore_index=255,
        id2label=dict(enumerate(COARSE_PARTS)), label2id={n: i for i, n in enumerate(COARSE_PARTS)},
    )  # fmt: skip


def build_segformer(pretrained: str | os.PathLike[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """SegformerForSemanticSegmentation with C outputs: random init from ``tiny_config`` (seeded), or the
    encoder of a LOCAL MiT / SegFormer folder (config.json + weights) with a new decode head."""
    from transformers import SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    if pretrained is None:
        return SegformerForSemanticSegmentation(tiny_config())
    path = Path(pretrained)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--pretrained {path}: not a local model folder (no config.json); give a folder holding a "
            "MiT / SegFormer checkpoint (e.g. a downloaded nvidia/mit-b5); nothing is downloaded here"
        )
    return SegformerForSemanticSegmentation.from_pretrained(
        path, num_labels=NUM_CLASSES, id2label=dict(enumerate(COARSE_PARTS)),
        label2id={n: i for i, n in enumerate(COARSE_PARTS)}, ignore_mismatched_sizes=True,
        local_files_only=True,
    )  # fmt: skip


def normalise(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 -> float32 with ImageNet mean / std (SegFormer's preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@dataclass
class TrainLog:
    """Result of ``train_segmenter``: iterations run, wall seconds, training images, loss per iteration."""

    iterations: int
    seconds: float
    images: int
    losses: list[float]


def train_segmenter(
    model: torch.nn.Module,
    data: SegData,
    iterations: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> TrainLog:
    """Train ``model`` for exactly ``iterations`` AdamW steps on ``data`` (reshuffled every pass; random
    horizontal flips, which are label-safe since left and right legs share the coarse class ``leg``);
    learning rate: 5 % linear warm-up then linear decay to 0 (SegFormer's poly schedule, power 1)."""
    if len(data) == 0:
        raise ValueError("no training images: the filter kept nothing")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"need iterations >= 1 and batch_size >= 1, got {iterations}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, iterations // 20)

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (iterations - step) / (iterations - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    model.train()
    order, cursor, losses = torch.randperm(len(data), generator=generator), 0, []
    started = time.perf_counter()
    for _ in range(iterations):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        images, labels = data.images[index], data.labels[index].long()
        flip = torch.rand(len(index), generator=generator) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
        loss = model(pixel_values=normalise(images), labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return TrainLog(iterations, time.perf_counter() - started, len(data), losses)


@torch.inference_mode()
def predict(model: torch.nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """(N, 3, H, W) uint8 -> (N, H, W) int64 class map (logits upsampled bilinearly to H x W)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        logits = model(pixel_values=normalise(chunk)).logits
        logits = F.interpolate(logits, size=chunk.shape[-2:], mode="bilinear", align_corners=False)
        out.append(logits.argmax(dim=1))
    return torch.cat(out)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class, over all pixels of (N, H, W)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    valid = (t >= 0) & (t < num_classes)
    return torch.bincount(t[valid] * num_classes + p[valid], minlength=num_classes**2).view(
        num_classes, num_classes
    )


def iou_from_confusion(confusion: Tensor) -> list[float]:
    """Per-class IoU = TP / (TP + FP + FN) from a (C, C) confusion matrix; NaN for a class absent from
    both the prediction and the target."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return [float(a / b) if b > 0 else math.nan for a, b in zip(tp.tolist(), union.tolist(), strict=True)]


def evaluate_segmenter(model: torch.nn.Module, data: SegData, batch_size: int = 32) -> dict[str, Any]:
    """Per-part IoU and mIoU in PERCENT on ``data``: ``iou`` {part: value}, ``miou`` (mean over the C
    classes, background included, as in the issue), ``miou_parts`` (animal parts only)."""
    confusion = confusion_matrix(predict(model, data.images, batch_size), data.labels)
    iou = [100.0 * v for v in iou_from_confusion(confusion)]
    parts = [v for name, v in zip(COARSE_PARTS, iou, strict=True) if name != "background"]
    return {
        "iou": dict(zip(COARSE_PARTS, iou, strict=True)),
        "miou": float(np.nanmean(iou)),
        "miou_parts": float(np.nanmean(parts)),
        "pixels": int(confusion.sum()),
    }
