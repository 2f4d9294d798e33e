"""Where generated poses come from: the built-in sampler, Animal3D's fitted poses, or a pose table.

Every source returns local axis-angle poses (J, 3) in radians with the global orientation (joint 0) set to
zero: the sampled viewpoint decides how the animal faces the camera, as in 3D-DST.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import pandas as pd

from prf.body.poses import PoseSampler, PoseSamplerConfig


class PoseSource(abc.ABC):
    """Draws one pose per call from a seeded generator."""

    num_joints: int

    @abc.abstractmethod
    def pose(self, rng: np.random.Generator) -> np.ndarray:
        """(J, 3) axis-angle, radians, joint 0 = zeros."""

    def describe(self) -> dict[str, object]:
        return {"kind": type(self).__name__}


class SamplerPoseSource(PoseSource):
    """The built-in seeded pose sampler (standing, walking, sitting, head turns, tail swings)."""

    def __init__(self, joint_names: list[str], config_path: str | Path | None = None) -> None:
        config = PoseSamplerConfig.from_yaml(config_path) if config_path else PoseSamplerConfig.default()
        self.sampler = PoseSampler(config, joint_names)
        self.num_joints = len(joint_names)
        self.config_path = str(config_path) if config_path else "builtin"

    def pose(self, rng: np.random.Generator) -> np.ndarray:
        return self.sampler.sample(1, seed=int(rng.integers(2**31)))[0]

    def describe(self) -> dict[str, object]:
        return {"kind": "sampler", "config": self.config_path}


class TablePoseSource(PoseSource):
    """Poses from a file: an Animal3D JSON ({"data": [{"pose": [...]}, ...]}), a Parquet table with a
    `pose` column of J*3 floats, or an NPZ with a `pose` array (N, J*3) or (N, J, 3)."""

    def __init__(self, path: str | Path, num_joints: int) -> None:
        self.path = Path(path)
        self.num_joints = num_joints
        poses = load_pose_table(self.path)
        if poses.ndim != 2 or poses.shape[1] != num_joints * 3:
            raise ValueError(
                f"{self.path}: poses have shape {poses.shape}, "
                f"expected (N, {num_joints * 3}) for a {num_joints}-joint model"
            )
        bad = ~np.isfinite(poses).all(axis=1)
        if bad.all():
            raise ValueError(f"{self.path}: no finite pose in the table")
        self.poses = poses[~bad].reshape(-1, num_joints, 3)
        self.poses[:, 0] = 0.0  # the viewpoint decides the global orientation
        self.skipped = int(bad.sum())

    def pose(self, rng: np.random.Generator) -> np.ndarray:
        return self.poses[int(rng.integers(len(self.poses)))].copy()

    def describe(self) -> dict[str, object]:
        return {"kind": "table", "path": str(self.path), "count": len(self.poses), "skipped": self.skipped}


class PoseFileError(ValueError):
    """A pose file that cannot be read as poses; the message names the file and the field."""


def load_pose_table(path: Path) -> np.ndarray:
    """(N, J*3) float64 poses from an Animal3D JSON, a Parquet file or an NPZ file. Errors name the file
    and the field."""
    if not path.exists():
        raise FileNotFoundError(f"pose file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".parquet", ".npz"):
        raise ValueError(f"{path}: unsupported pose file type {suffix!r} (use .json, .parquet or .npz)")
    try:
        poses = _read_pose_rows(path, suffix)
    except PoseFileError:
        raise
    except (TypeError, ValueError) as err:  # numpy on non-numeric or ragged values
        raise PoseFileError(f"{path}: field 'pose' must hold lists of numbers ({err})") from None
    if poses.ndim != 2 or poses.shape[0] == 0 or poses.shape[1] == 0:
        raise PoseFileError(f"{path}: field 'pose' holds no poses")
    return poses


def _read_pose_rows(path: Path, suffix: str) -> np.ndarray:
    if suffix == ".json":
        data = json.loads(path.read_text())
        entries = data["data"] if isinstance(data, dict) and "data" in data else data
        if not isinstance(entries, list):
            raise PoseFileError(f"{path}: expected an Animal3D JSON with a 'data' list")
        rows = [e["pose"] for e in entries if isinstance(e, dict) and "pose" in e]
        if not rows:
            raise PoseFileError(f"{path}: no entry has a field 'pose'")
        lengths = {len(r) if isinstance(r, list) else -1 for r in rows}
        if len(lengths) != 1 or -1 in lengths:
            raise PoseFileError(f"{path}: field 'pose' has mixed lengths or non-lists ({sorted(lengths)})")
        return np.asarray(rows, dtype=np.float64)
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
        if "pose" not in frame.columns:
            raise PoseFileError(f"{path}: no 'pose' column (columns: {list(frame.columns)})")
        if frame.empty:
            raise PoseFileError(f"{path}: field 'pose' holds no poses")
        return np.stack([np.asarray(v, dtype=np.float64) for v in frame["pose"]])
    with np.load(path, allow_pickle=False) as npz:
        if "pose" not in npz.files:
            raise PoseFileError(f"{path}: no 'pose' array (arrays: {npz.files})")
        poses = np.asarray(npz["pose"], dtype=np.float64)
    if poses.ndim == 0 or poses.shape[0] == 0:
        raise PoseFileError(f"{path}: field 'pose' holds no poses")
    return poses.reshape(poses.shape[0], -1)


def build_pose_source(poses: str | None, joint_names: list[str], pose_config: str | None) -> PoseSource:
    """The sampler when no pose file is given, else the table in that file."""
    if poses is None:
        return SamplerPoseSource(joint_names, pose_config)
    return TablePoseSource(poses, len(joint_names))
