"""Image backbones built by name from timm (``features_only``), with optional local weights.

Shape legend: B batch, C channels of the chosen feature level, H, W input size (pixels),
h = H / reduction, w = W / reduction.

Defaults:
- CPU (tests, smoke runs, ~15 min training on 2 cores at 96-128 px): ``regnetx_002`` at the stride-16 level
  (``out_index=-2``, 152 channels, 8 x 8 at 128 px). Measured forward+backward at 128 px, batch 32, one
  thread: ~116 images/s (stride 16) and ~83 images/s (stride 32); plain conv + BN + ReLU trains from
  scratch more easily than the depthwise/SE mobile nets of similar speed.
- Real runs (GPU, 224 px): ``resnet50`` (2048 channels at stride 32) or ``hrnet_w32`` (timm's incremental
  features, 1024 channels at stride 32; ``out_index=-2`` gives 512 at stride 16). Both build offline with
  ``pretrained=False``; ImageNet weights come only from a local file given as ``pretrained_path``.

Weights are never downloaded.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

CPU_DEFAULT_BACKBONE = "regnetx_002"
CPU_DEFAULT_OUT_INDEX = -2
REAL_RUN_BACKBONES: tuple[str, ...] = ("resnet50", "hrnet_w32")

# Wrappers that training code commonly puts in front of a backbone's own keys.
_KEY_PREFIXES: tuple[str, ...] = ("module.", "model.", "net.", "backbone.", "body.")


@dataclass
class LoadReport:
    """What loading a local state dict into a backbone did (keys are the features model's names)."""

    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


class Backbone(nn.Module):
    """A timm features model returning one feature map.

    With ``skip_index`` the map is a two-level fusion (a minimal FPN, as in Simple Baselines / HRNet heads):
    the ``out_index`` level upsampled bilinearly to the ``skip_index`` level's size and concatenated with it.
    It keeps the deep level's context (which side of the animal a leg is on) at the shallower level's
    resolution, which is what 2D keypoint precision needs on small crops.

    Attributes:
        name: timm model name.
        out_index: the feature level asked for (negative counts from the deepest level).
        skip_index: a shallower level fused in, or None.
        out_channels: C of the returned map (from timm's ``feature_info``; the sum of both levels when fused).
        reduction: stride of the returned map w.r.t. the input (pixels per feature cell).
        input_mean, input_std: per-channel RGB normalisation the backbone expects (inputs in [0, 1]
            are normalised as ``(x - mean) / std``).
        load_report: set when local weights were loaded, else None.
    """

    def __init__(self, body: nn.Module, name: str, out_index: int, skip_index: int | None = None) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.out_index = out_index
        self.skip_index = skip_index
        channels = body.feature_info.channels()
        self.out_channels: int = int(sum(channels) if skip_index is not None else channels[-1])
        self.reduction: int = int(body.feature_info.reduction()[0 if skip_index is not None else -1])
        cfg = getattr(body, "pretrained_cfg", None) or {}
        self.input_mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.input_std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.load_report: LoadReport | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) features."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        levels = self.body(images)
        if self.skip_index is None:
            return levels[-1]
        shallow, deep = levels[0], levels[-1]
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([shallow, deep], dim=1)


def build_backbone(
    name: str,
    pretrained_path: str | Path | None = None,
    out_index: int = -1,
    strict: bool = True,
    skip_index: int | None = None,
    **kwargs,
) -> Backbone:
    """Build a timm ``features_only`` backbone returning the feature level ``out_index``.

    Args:
        name: any timm model name with features support (e.g. "regnetx_002", "resnet50", "hrnet_w32").
        pretrained_path: optional local weights (``torch.save``-d state dict): a timm full-model state dict
            (classifier keys are ignored), a features-model / ``Backbone`` state dict, or a checkpoint dict
            holding one under "state_dict" or "model". Never downloaded.
        out_index: feature level (index into timm's ``feature_info``; -1 deepest, -2 one stride less, ...).
        skip_index: optional shallower level fused with ``out_index`` (see ``Backbone``), e.g. -3 with -2.
        strict: if True, weights missing from the file are an error; if False they are logged and keep
            their random initialisation.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    if kwargs.get("pretrained"):
        raise ValueError("build_backbone never downloads weights: pass pretrained_path=<local file> instead")
    kwargs.pop("pretrained", None)
    for reserved in ("features_only", "out_indices"):
        if reserved in kwargs:
            raise ValueError(f"{reserved!r} is set by build_backbone; choose the level with out_index")
    levels = _num_levels(name, **kwargs)
    indices = [out_index] if skip_index is None else [skip_index, out_index]
    for index in indices:
        if not -levels <= index < levels:
            raise ValueError(
                f"feature level {index} is out of range for {name!r}, which has {levels} feature levels "
                f"(use 0..{levels - 1} or -{levels}..-1)"
            )
    if skip_index is not None and skip_index % levels >= out_index % levels:
        raise ValueError(f"skip_index={skip_index} must be a shallower level than out_index={out_index}")
    body = timm.create_model(name, features_only=True, pretrained=False, out_indices=tuple(indices), **kwargs)
    backbone = Backbone(body, name=name, out_index=out_index, skip_index=skip_index)
    if pretrained_path is not None:
        backbone.load_report = load_backbone_weights(backbone, pretrained_path, strict=strict)
    return backbone


def _num_levels(name: str, **kwargs) -> int:
    """Number of feature levels timm's features model of ``name`` has (a clear error for unknown names)."""
    try:
        return len(timm.create_model(name, features_only=True, pretrained=False, **kwargs).feature_info)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"timm has no model named {name!r}; list candidates with timm.list_models('*{name[:6]}*')"
            ) from err
        raise


def load_backbone_weights(backbone: Backbone, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a local state dict into ``backbone.body``; see ``build_backbone`` for accepted formats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {str(path)!r} does not exist; give a local torch.save-d state dict "
            "or leave pretrained_path=None for random initialisation"
        )
    if path.suffix == ".safetensors":
        raise ValueError(
            f"{path.name}: .safetensors is not supported (safetensors is not installed); convert it with "
            "torch.save(safetensors.torch.load_file(path), 'weights.pt') on a machine that has it"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain tensor state dict (torch.load weights_only=True refused it); "
            "save it with torch.save(model.state_dict(), path)"
        ) from err
    state = _unwrap_state_dict(checkpoint, path)
    target = backbone.body.state_dict()
    mapped, unexpected = _match_keys(state, set(target))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if v.shape != target[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for {backbone.name!r} "
            f"(weights of another architecture?): {mismatched[:5]}"
        )
    if not mapped:
        raise ValueError(
            f"{path}: none of its {len(state)} keys match the {backbone.name!r} features model "
            f"(file keys start {sorted(state)[:3]}, model keys start {sorted(target)[:3]})"
        )
    missing = sorted(k for k in target if k not in mapped)
    serious = [k for k in missing if not k.endswith("num_batches_tracked")]
    if serious and strict:
        raise ValueError(
            f"{path}: {len(serious)} weights of the {backbone.name!r} features model are missing from the "
            f"file, e.g. {serious[:5]}; pass strict=False to keep them randomly initialised"
        )
    backbone.body.load_state_dict(mapped, strict=False)
    report = LoadReport(path=str(path), loaded=len(mapped), missing=missing, unexpected=sorted(unexpected))
    if serious:
        logger.warning("%s: %d backbone weights missing, left random: %s", path, len(serious), serious[:5])
    if unexpected:
        logger.info(
            "%s: ignored %d keys not in the features model, e.g. %s", path, len(unexpected), unexpected[:5]
        )
    return report


def _unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """Return the tensor dict inside a checkpoint (plain, or under "state_dict" / "model")."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, dict):
                checkpoint = inner
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} does not hold a state dict (a non-empty dict of name -> tensor)")
    tensors = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds a dict without tensors; expected a state dict")
    return tensors


def _candidate_names(key: str) -> list[str]:
    """Names a checkpoint key may have in a timm features model.

    Tries the key itself, the key with wrapper prefixes stripped, and timm's flattened form for sequential
    children ("blocks.0.x" in the full model is "blocks_0.x" in the features model).
    """
    names = [key]
    stripped = key
    while stripped.startswith(_KEY_PREFIXES):
        stripped = stripped.split(".", 1)[1]
        names.append(stripped)
    flattened = []
    for name in names:
        parts = name.split(".")
        if len(parts) > 2:
            flattened.append(f"{parts[0]}_{parts[1]}." + ".".join(parts[2:]))
    return names + flattened


def _match_keys(
    state: dict[str, torch.Tensor], target_keys: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint keys onto features-model keys; return (mapped state, unexpected checkpoint keys)."""
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        match = next((n for n in _candidate_names(key) if n in target_keys), None)
        if match is None or match in mapped:
            unexpected.append(key)
        else:
            mapped[match] = value
    return mapped, unexpected
