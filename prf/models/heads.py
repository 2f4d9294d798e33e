"""Regressor heads: their shared output type, a name -> head registry, and the backbone + head network.

Shape legend: B batch, J joints, NB shape coefficients (betas), C backbone channels, h, w feature-map size,
P part channels (J, or J + 1 with a background channel first).

Camera convention (both heads): weak perspective ``cam = [s, tx, ty]`` in normalised crop coordinates
(crop spans [-1, 1]); a 3D point X (metres, camera-aligned frame) projects to ``s * (X[:2] + [tx, ty])``,
as in HMR / SPIN. ``s ~ 0.9`` means the body roughly fills the crop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from prf.models.backbone import Backbone, build_backbone

DEFAULT_CAM_SCALE = 0.9


@dataclass
class RegressorOutput:
    """What every head returns.

    Attributes:
        pose_rotmat: (B, J, 3, 3) per-joint rotations relative to the parent (joint 0 = global orientation).
        betas: (B, NB) SMAL shape coefficients.
        cam: (B, 3) weak-perspective camera [s, tx, ty] (see module docstring).
        part_logits: (B, P, h', w') part-segmentation logits (channel 0 = background when there is one,
            then one channel per joint), or None for heads without a part branch.
        attention: (B, J, h', w') per-joint spatial attention (sums to 1 over h' x w'), or None.
        keypoint_heatmaps: (B, K, h', w') per-keypoint spatial softmax, or None for heads without a keypoint
            branch.
        keypoints_2d: (B, K, 2) the heatmaps' expected positions (soft-argmax), normalised crop coordinates,
            or None: the 2D keypoints the network sees in the image, independent of the SMAL fit.
    """

    pose_rotmat: torch.Tensor
    betas: torch.Tensor
    cam: torch.Tensor
    part_logits: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    keypoint_heatmaps: torch.Tensor | None = None
    keypoints_2d: torch.Tensor | None = None


def checked_buffer(value: torch.Tensor | None, shape: tuple[int, ...], default: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``value`` (or ``default`` when None) after checking that it has ``shape``."""
    if value is None:
        return default
    value = torch.as_tensor(value, dtype=torch.float32)
    if tuple(value.shape) != shape:
        raise ValueError(f"expected a tensor of shape {shape}, got {tuple(value.shape)}")
    return value.clone()


HeadFactory = Callable[..., nn.Module]
HEAD_REGISTRY: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Class decorator adding a head to ``HEAD_REGISTRY`` under ``name``."""

    def decorate(factory: HeadFactory) -> HeadFactory:
        if name in HEAD_REGISTRY and HEAD_REGISTRY[name] is not factory:
            raise ValueError(f"a head named {name!r} is already registered ({HEAD_REGISTRY[name]})")
        HEAD_REGISTRY[name] = factory
        return factory

    return decorate


def _register_builtin_heads() -> None:
    """Import the built-in head modules so their ``register_head`` decorators run."""
    from prf.models import hmr, pare  # noqa: F401


def build_head(name: str, in_channels: int, num_joints: int, num_betas: int, **kwargs) -> nn.Module:
    """Build a registered head ("pare", "hmr", ...) for features with ``in_channels`` channels."""
    _register_builtin_heads()
    if name not in HEAD_REGISTRY:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(HEAD_REGISTRY)}")
    return HEAD_REGISTRY[name](in_channels=in_channels, num_joints=num_joints, num_betas=num_betas, **kwargs)


# Constructor arguments every head gets from the backbone and the body model, not from the config.
_SIZED_BY_BUILDER = ("in_channels", "num_joints", "num_betas")


def head_options(name: str) -> tuple[str, ...]:
    """The keyword options a registered head takes from a config's ``model.head`` (its constructor's
    arguments other than the sizes ``build_regressor_net`` fills in)."""
    _register_builtin_heads()
    if name not in HEAD_REGISTRY:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(HEAD_REGISTRY)}")
    parameters = inspect.signature(HEAD_REGISTRY[name]).parameters.values()
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in parameters if p.kind in keyword and p.name not in _SIZED_BY_BUILDER)


def unknown_head_options(name: str, options: Collection[str]) -> list[str]:
    """The keys of ``options`` the head ``name`` does not take (empty when all are known)."""
    known = set(head_options(name))
    return sorted(key for key in options if key not in known)


class PoseRegressorNet(nn.Module):
    """Backbone + head: (B, 3, H, W) normalised images -> RegressorOutput."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise TypeError("backbone must expose out_channels (use prf.models.backbone.build_backbone)")
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> RegressorOutput:
        """(B, 3, H, W) normalised float images -> RegressorOutput (shapes in its docstring)."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected float images of shape (B, 3, H, W), got {tuple(images.shape)} {images.dtype}"
            )
        return self.head(self.backbone(images))


def build_regressor_net(
    arch: str,
    backbone: str,
    num_joints: int,
    num_betas: int,
    pretrained_path: str | Path | None = None,
    out_index: int = -1,
    skip_index: int | None = None,
    **head_kwargs,
) -> PoseRegressorNet:
    """Build backbone ``backbone`` (timm name) and head ``arch`` ("pare" / "hmr") sized from its channels.

    ``out_index`` picks the backbone's feature level and ``skip_index`` an optional shallower level fused
    with it (see ``build_backbone``); ``head_kwargs`` go to the head's constructor.
    """
    body: Backbone = build_backbone(
        backbone, pretrained_path=pretrained_path, out_index=out_index, skip_index=skip_index
    )
    head = build_head(
        arch, in_channels=body.out_channels, num_joints=num_joints, num_betas=num_betas, **head_kwargs
    )
    return PoseRegressorNet(body, head)


def freeze_unreachable_parameters(
    net: PoseRegressorNet, input_size: int, outputs: Collection[str] | None = None
) -> list[str]:
    """Turn off ``requires_grad`` of the parameters none of ``outputs`` (RegressorOutput field names;
    default every field) depends on; returns their names. Training passes the fields its loss reads
    (``prf.models.losses.loss_outputs``), so a branch whose loss terms have weight 0 is frozen too.

    Some timm features models compute more than the levels they return: HRNet's ``features_only`` model
    runs an "incre" module on each of its four branches and returns only the chosen ones, so the other
    modules and the stage-4 fusions feeding only them never receive a gradient. Plain training just skips
    them, but DDP (the paper configs' strategy) stops at the second step with "parameters that were not
    used in producing the loss". Freezing them keeps DDP's cheap default (no per-step search for unused
    parameters) and leaves them out of the optimiser. Found by one eval-mode forward pass of a
    (1, 3, ``input_size``, ``input_size``) zero image and a gradient of every output's sum, so it follows
    the graph the net really builds; the training mode is restored after.
    """
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            probe = torch.zeros(1, 3, input_size, input_size, device=trainable[0][1].device)
            out = net(probe)
            wanted = [getattr(out, f.name) for f in fields(out) if outputs is None or f.name in outputs]
            total = sum(o.float().sum() for o in wanted if isinstance(o, torch.Tensor))
            if not isinstance(total, torch.Tensor):
                raise ValueError(f"the net computes none of the outputs {sorted(outputs or [])}")
            grads = torch.autograd.grad(total, [p for _, p in trainable], allow_unused=True)
    finally:
        net.train(was_training)
    frozen = []
    for (name, p), grad in zip(trainable, grads, strict=True):
        if grad is None:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
