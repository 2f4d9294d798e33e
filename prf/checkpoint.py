"""Exported regressor checkpoints: a light, plain-typed file that ``torch.load(weights_only=True)`` reads.

An export (``<run>/export.pt``) is a dict holding only tensors, str, int, float, bool, None, list and dict:

    format, format_version   "prf-regressor-export", 1
    state_dict               the PoseRegressorNet's state dict (backbone + head)
    net                      {arch, backbone, num_joints, num_betas, out_index, skip_index, head_kwargs}:
                             enough to rebuild the net with ``prf.models.heads.build_regressor_net``
    arch, backbone           copies of net["arch"], net["backbone"]
    input_size, crop_scale   crop side S in pixels, box side / max(w, h)
    projection               "perspective" or "weak" (``prf.models.regressor.project_keypoints``)
    normalisation            {mean: [3], std: [3]} applied to crops in [0, 1]
    smal_layout              ``SMAL.layout_signature()`` of the body model it was trained with
    stage, name              "synthetic" | "pretrain" | "finetune", a short name (e.g. "synthetic-pare")
    config                   the resolved training config (plain dict)
    metrics                  final validation metrics {name: float}

Next to it, ``export.pt.sha256`` holds ``<hex digest>  export.pt`` (sha256sum format) over the file bytes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXPORT_FORMAT = "prf-regressor-export"
EXPORT_FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "format_version",
    "state_dict",
    "net",
    "arch",
    "backbone",
    "input_size",
    "crop_scale",
    "normalisation",
    "smal_layout",
    "stage",
)
_LAYOUT_KEYS = ("name", "num_vertices", "num_joints", "num_betas", "joint_names", "parents", "sha256")


class LayoutMismatchError(ValueError):
    """A checkpoint was trained for another SMAL layout than the body model it is used with."""


class ChecksumError(ValueError):
    """A checkpoint's bytes do not match its ``.sha256`` sidecar."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def describe_layout(layout: dict[str, Any]) -> str:
    """One line naming a layout: its model name, joints, betas, vertices and mesh hash."""
    return (
        f"{layout.get('name')!r} ({layout.get('num_joints')} joints, {layout.get('num_betas')} betas, "
        f"{layout.get('num_vertices')} vertices, mesh {layout.get('sha256')})"
    )


def check_layout(trained: dict[str, Any], given: dict[str, Any], source: str) -> None:
    """Raise LayoutMismatchError unless two ``layout_signature()`` dicts agree on every layout key.

    Args:
        trained: the layout stored in the checkpoint; given: the body model's; source: the checkpoint's name
            (for the message).
    """
    differing = [k for k in _LAYOUT_KEYS if trained.get(k) != given.get(k)]
    if differing:
        raise LayoutMismatchError(
            f"{source} was trained for SMAL layout {describe_layout(trained)}, but the body model given is "
            f"{describe_layout(given)} (they differ in {', '.join(differing)}). Use the SMAL model the "
            "checkpoint was trained with (--smal FILE, or none for the built-in quadruped), or retrain."
        )


def plain(value: Any) -> Any:
    """``value`` in types that ``torch.load(weights_only=True)`` accepts (Paths and tuples converted)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in an exported checkpoint: {value!r}")


def save_export(path: str | os.PathLike[str], model: nn.Module, **fields: Any) -> Path:
    """Write an export of ``model`` (the net) and its ``.sha256`` sidecar; ``fields`` are the other keys
    (module docstring).

    The state dict is copied to CPU; the file is written to a temporary name and renamed (atomic).
    """
    path = Path(path)
    payload = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        **plain(fields),
    }
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"an export needs the keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    sidecar_path(path).write_text(f"{sha256_file(path)}  {path.name}\n", encoding="utf-8")
    return path


def save_untrained_export(
    path: str | os.PathLike[str], input_size: int, seed: int, head_kwargs: dict[str, Any], name: str
) -> Path:
    """An UNTRAINED PARE regressor (regnetx_002 at stride 16, seeded random head ``head_kwargs``) for the
    built-in quadruped, exported the way ``prf train`` does: for tests and smoke runs of the machinery only
    (its metrics mean nothing; ``name`` should say so)."""
    from prf.body.smal import SMAL
    from prf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from prf.models.heads import build_regressor_net

    body = SMAL.builtin()
    torch.manual_seed(seed)
    net = build_regressor_net(
        "pare", "regnetx_002", body.num_joints, body.num_betas, out_index=-2, **head_kwargs
    )
    spec = {"arch": "pare", "backbone": "regnetx_002", "num_joints": body.num_joints,
            "num_betas": body.num_betas, "out_index": -2, "head_kwargs": head_kwargs}  # fmt: skip
    return save_export(
        path, net, net=spec, arch="pare", backbone="regnetx_002", input_size=input_size, crop_scale=1.25,
        normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        smal_layout=body.layout_signature(), stage="synthetic", name=name,
    )  # fmt: skip


def load_export(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Load an export with ``torch.load(weights_only=True)`` (never unpickles code).

    Checks the sha256 sidecar when it exists (``verify``), the format marker and the required keys.
    Raises FileNotFoundError, ChecksumError or ValueError with a message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sidecar = sidecar_path(path)
    if verify and sidecar.is_file():
        expected = sidecar.read_text(encoding="utf-8").split()[0].lower()
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: sha256 {actual[:16]}... does not match {sidecar.name} ({expected[:16]}...); the "
                "file is corrupt or was replaced: re-copy it, or delete the stale .sha256"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} is not an exported PRF regressor (torch.load weights_only=True failed: {err}); "
            "export one with `prf train` (it writes <run>/export.pt), not a Lightning .ckpt"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an exported PRF regressor (no format marker {EXPORT_FORMAT!r})")
    if payload.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} has export format version {payload.get('format_version')!r}; this prf reads "
            f"version {EXPORT_FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}; it is not a complete export")
    return payload


def build_net_from_export(export: dict[str, Any]) -> nn.Module:
    """Rebuild the PoseRegressorNet described by ``export["net"]`` and load its weights (eval mode)."""
    from prf.models.heads import build_regressor_net

    spec = export["net"]
    net = build_regressor_net(
        spec["arch"],
        spec["backbone"],
        int(spec["num_joints"]),
        int(spec["num_betas"]),
        out_index=int(spec["out_index"]),
        skip_index=None if spec.get("skip_index") is None else int(spec["skip_index"]),
        **dict(spec.get("head_kwargs") or {}),
    )
    net.load_state_dict(export["state_dict"])
    return net.eval()
