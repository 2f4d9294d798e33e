"""Seeded pose sampler for SMAL-layout quadrupeds: standing, walking, sitting, head turns, tail swings.

Poses are local axis-angle rotations (relative to the parent joint) about SMAL's axes (x forward, y to the
animal's left, z up), radians, with joint 0 (global orientation) zero: viewpoints decide the orientation.
Ranges live in a YAML file (prf/configs/pose_sampler.yaml, in degrees). Joints are found by name, so the
33-joint SMAL layout (no ears) works too: groups skip joints a model lacks.

A joint's axis-angle vector is the sum of the per-axis angles sampled for it, (roll, pitch, yaw); for the
moderate angles used here this is close to composing the three rotations, and each component stays within
its configured range (plus the jitter), which keeps the sampler easy to reason about and to test.

Legend: n samples, J joints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from prf.body.layout import JOINT_NAMES_35

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pose_sampler.yaml"

LEG_JOINTS: dict[str, tuple[str, ...]] = {
    "left_front_leg": ("LLeg1", "LLeg2", "LLeg3", "LFoot"),
    "right_front_leg": ("RLeg1", "RLeg2", "RLeg3", "RFoot"),
    "left_back_leg": ("LLegBack1", "LLegBack2", "LLegBack3", "LFootBack"),
    "right_back_leg": ("RLegBack1", "RLegBack2", "RLegBack3", "RFootBack"),
}
SPINE_JOINTS = ("pelvis0", "spine", "spine0", "spine1", "spine2", "spine3")
TAIL_JOINTS = tuple(f"Tail{i}" for i in range(1, 8))
MODE_NAMES = ("standing", "walking", "sitting", "head_turn", "tail_swing")
# Lateral-sequence walk: phase offset of each leg (left-back leads, then left-front, right-back, right-front).
_WALK_PHASE = {"left_back_leg": 0.0, "left_front_leg": 0.5, "right_back_leg": 1.0, "right_front_leg": 1.5}
_PITCH, _YAW, _ROLL = 1, 2, 0


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"a range must be [low, high] in degrees with low <= high, got [{low}, {high}]")
    return value


Range = Annotated[tuple[float, float], AfterValidator(_check_range)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _HeadTail(_Strict):
    """Ranges shared by every mode (degrees; signs in the YAML file's header)."""

    probability: float = Field(ge=0.0)
    spine_pitch: Range
    spine_yaw: Range
    neck_pitch: Range
    neck_yaw: Range
    head_pitch: Range
    head_yaw: Range
    tail_pitch: Range
    tail_yaw: Range


class StandingMode(_HeadTail):
    """Standing still (also head turns and tail swings, with wider head or tail ranges)."""

    front_leg_pitch: Range
    back_leg_pitch: Range


class WalkingMode(_HeadTail):
    """Walking: shoulders and hips swing in gait phase; swinging legs fold their lower joints."""

    front_stride: Range
    back_stride: Range
    front_lift: Range
    back_lift: Range


class SittingMode(_HeadTail):
    """Sitting: hind legs folded, trunk pitched nose-up, front legs kept vertical, head kept level."""

    body_pitch: Range
    hip_flexion: Range
    knee_flexion: Range
    hock_flexion: Range
    hip_abduction: Range
    front_leg_pitch: Range


class Modes(_Strict):
    standing: StandingMode
    walking: WalkingMode
    sitting: SittingMode
    head_turn: StandingMode
    tail_swing: StandingMode


class PoseSamplerConfig(_Strict):
    """Pose sampler configuration: per-mode ranges in degrees, mode probabilities, jitter."""

    jitter_deg: float = Field(ge=0.0, le=20.0)
    modes: Modes

    def probabilities(self) -> np.ndarray:
        """(5,) mode probabilities in MODE_NAMES order, normalised to sum to 1."""
        p = np.array([getattr(self.modes, m).probability for m in MODE_NAMES], dtype=np.float64)
        if p.sum() <= 0:
            raise ValueError(
                "pose sampler: every mode probability is 0; give at least one mode a probability > 0"
            )
        return p / p.sum()

    @classmethod
    def from_yaml(cls, path: str | Path) -> PoseSamplerConfig:
        """Load and validate a YAML file; unknown keys, missing keys and bad ranges are errors."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pose sampler config not found: {path}")
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping with 'jitter_deg' and 'modes' at the top level")
        try:
            config = cls.model_validate(raw)
        except ValidationError as err:
            lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
            raise ValueError(f"{path}: invalid pose sampler config:\n" + "\n".join(lines)) from None
        config.probabilities()
        return config

    @classmethod
    def default(cls) -> PoseSamplerConfig:
        """The packaged default, prf/configs/pose_sampler.yaml."""
        return cls.from_yaml(DEFAULT_CONFIG)


def leg_joint_indices(joint_names: Sequence[str]) -> dict[str, list[int]]:
    """The four legs' joint indices by name, shoulder/hip first, foot last.

    Returns:
        {"left_front_leg": [...], "right_front_leg": [...], "left_back_leg": [...], "right_back_leg": [...]}
        (joints a model lacks are skipped).

    Raises:
        ValueError: if a leg has none of its SMAL joints (the names are not a SMAL layout).
    """
    index = {n: i for i, n in enumerate(joint_names)}
    legs = {leg: [index[n] for n in names if n in index] for leg, names in LEG_JOINTS.items()}
    missing = [leg for leg, idx in legs.items() if not idx]
    if missing:
        raise ValueError(
            f"joint names have no joint of {missing} (expected SMAL names such as {LEG_JOINTS[missing[0]]}); "
            "is this a SMAL-layout model?"
        )
    return legs


class _Draws:
    """Hands out columns of a fixed uniform block, mapped onto ranges (degrees)."""

    def __init__(self, u: np.ndarray) -> None:
        self.u, self.next = u, 0

    def __call__(self, r: tuple[float, float]) -> np.ndarray:
        if self.next >= self.u.shape[1]:
            raise RuntimeError("pose sampler: a mode draws more parameters than PoseSampler reserves columns")
        col = self.u[:, self.next]
        self.next += 1
        return r[0] + (r[1] - r[0]) * col


class PoseSampler:
    """Seeded sampler of plausible quadruped poses for a SMAL-layout model.

    Args:
        config: ranges and mode probabilities (PoseSamplerConfig.default() for the packaged one).
        joint_names: the model's J joint names (SMAL's 35 or 33; matched by name).
    """

    _PARAM_COLUMNS = 64  # uniform columns reserved for a sample's mode parameters

    def __init__(self, config: PoseSamplerConfig, joint_names: Sequence[str]) -> None:
        self.config = config
        self.joint_names = tuple(joint_names)
        self.num_joints = len(self.joint_names)
        self.index = {n: i for i, n in enumerate(self.joint_names)}
        self.legs = leg_joint_indices(self.joint_names)  # raises early for a non-SMAL layout
        self.mode_names = MODE_NAMES
        self._cum = np.cumsum(config.probabilities())
        # Jitter per joint, degrees: spine and tail chains share theirs so a chain's total bend stays small.
        self.jitter_deg = np.full(self.num_joints, config.jitter_deg)
        for chain in (SPINE_JOINTS, TAIL_JOINTS):
            present = [self.index[n] for n in chain if n in self.index]
            self.jitter_deg[present] = config.jitter_deg / max(len(present), 1)
        self.jitter_deg[0] = 0.0
        # Jitter slot of each joint: SMAL names use their 35-layout index (so 33- and 35-joint layouts draw
        # the same jitter for the joints they share); any other name gets a slot of its own after those.
        smal = {n: i for i, n in enumerate(JOINT_NAMES_35)}
        n_smal = len(JOINT_NAMES_35)
        others = [n for n in self.joint_names if n not in smal]
        slot = {**smal, **{n: n_smal + k for k, n in enumerate(others)}}
        self._jitter_slot = np.array([slot[n] for n in self.joint_names])
        self._extra_slots = len(others)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(n, J, 3) axis-angle poses, radians; the same (n, seed) always gives the same poses."""
        return self.sample_with_modes(n, seed)[0]

    def sample_with_modes(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Poses (n, J, 3) radians and each sample's mode name (n,) (one of MODE_NAMES).

        Sample i depends only on (seed, i): the first k of sample(n, seed) equal sample(k, seed).
        """
        if n < 0:
            raise ValueError(f"number of poses must be >= 0, got {n}")
        u = np.random.default_rng(seed).random((n, 1 + self._PARAM_COLUMNS + 3 * len(JOINT_NAMES_35)))
        if self._extra_slots:  # joints outside SMAL's names draw from a second stream, same seed
            extra = np.random.default_rng([seed, 1]).random((n, 3 * self._extra_slots))
            u = np.concatenate([u, extra], axis=1)
        mode = np.minimum(np.searchsorted(self._cum, u[:, 0], side="right"), len(MODE_NAMES) - 1)
        deg = np.zeros((n, self.num_joints, 3))
        fill = {
            "standing": self._standing,
            "walking": self._walking,
            "sitting": self._sitting,
            "head_turn": self._standing,
            "tail_swing": self._standing,
        }
        for m, name in enumerate(MODE_NAMES):
            sel = np.flatnonzero(mode == m)
            if sel.size:
                cfg = getattr(self.config.modes, name)
                draws = _Draws(u[sel, 1 : 1 + self._PARAM_COLUMNS])
                deg[sel] = fill[name](cfg, draws, sel.size)
        jitter = (2.0 * u[:, 1 + self._PARAM_COLUMNS :] - 1.0).reshape(
            n, len(JOINT_NAMES_35) + self._extra_slots, 3
        )
        deg += jitter[:, self._jitter_slot] * self.jitter_deg[None, :, None]
        deg[:, 0] = 0.0
        return np.deg2rad(deg), np.array(MODE_NAMES)[mode]

    # -- helpers ------------------------------------------------------------------------------------------

    def _add(self, pose: np.ndarray, names: Sequence[str], axis: int, value: np.ndarray) -> None:
        """Add value (k,) degrees about axis to each named joint the model has."""
        for name in names:
            if name in self.index:
                pose[:, self.index[name], axis] += value

    def _head_tail(self, cfg: _HeadTail, draw: _Draws, pose: np.ndarray) -> None:
        self._add(pose, SPINE_JOINTS, _PITCH, draw(cfg.spine_pitch))
        self._add(pose, SPINE_JOINTS, _YAW, draw(cfg.spine_yaw))
        self._add(pose, ["Neck"], _PITCH, draw(cfg.neck_pitch))
        self._add(pose, ["Neck"], _YAW, draw(cfg.neck_yaw))
        self._add(pose, ["Head"], _PITCH, draw(cfg.head_pitch))
        self._add(pose, ["Head"], _YAW, draw(cfg.head_yaw))
        self._add(pose, TAIL_JOINTS, _PITCH, draw(cfg.tail_pitch))
        self._add(pose, TAIL_JOINTS, _YAW, draw(cfg.tail_yaw))

    def _level_paws(self, pose: np.ndarray) -> None:
        """Counter-rotate each foot by the pitch accumulated above it, so the paws stay level."""
        spine = [self.index[n] for n in SPINE_JOINTS if n in self.index]
        trunk = pose[:, spine, _PITCH].sum(axis=1)
        for leg, names in LEG_JOINTS.items():
            if names[-1] not in self.index:
                continue
            above = [self.index[n] for n in names[:-1] if n in self.index]
            total = pose[:, above, _PITCH].sum(axis=1) + (trunk if "front" in leg else 0.0)
            pose[:, self.index[names[-1]], _PITCH] = -total

    def _standing(self, cfg: StandingMode, draw: _Draws, k: int) -> np.ndarray:
        pose = np.zeros((k, self.num_joints, 3))
        self._head_tail(cfg, draw, pose)
        for leg, names in LEG_JOINTS.items():
            swing = draw(cfg.front_leg_pitch if "front" in leg else cfg.back_leg_pitch)
            self._add(pose, names[:1], _PITCH, swing)
        self._level_paws(pose)
        return pose

    def _walking(self, cfg: WalkingMode, draw: _Draws, k: int) -> np.ndarray:
        pose = np.zeros((k, self.num_joints, 3))
        self._head_tail(cfg, draw, pose)
        phase = 2.0 * np.pi * draw((0.0, 1.0))
        stride = {"front": draw(cfg.front_stride), "back": draw(cfg.back_stride)}
        lift = {"front": draw(cfg.front_lift), "back": draw(cfg.back_lift)}
        for leg, (top, mid, low, _) in LEG_JOINTS.items():
            end = "front" if "front" in leg else "back"
            psi = phase + np.pi * _WALK_PHASE[leg]
            self._add(pose, [top], _PITCH, -stride[end] * np.sin(psi))  # sin > 0: paw ahead of the shoulder
            swing = lift[end] * np.maximum(0.0, np.cos(psi))  # the leg travels forward while cos > 0
            if end == "front":  # elbow and wrist fold the paw back
                self._add(pose, [mid], _PITCH, 0.4 * swing)
                self._add(pose, [low], _PITCH, 0.6 * swing)
            else:  # the knee folds the shank back, the hock brings the paw forward
                self._add(pose, [mid], _PITCH, swing)
                self._add(pose, [low], _PITCH, -0.8 * swing)
        self._level_paws(pose)
        return pose

    def _sitting(self, cfg: SittingMode, draw: _Draws, k: int) -> np.ndarray:
        pose = np.zeros((k, self.num_joints, 3))
        self._head_tail(cfg, draw, pose)
        body = draw(cfg.body_pitch)
        spine = [n for n in SPINE_JOINTS if n in self.index]
        self._add(pose, spine, _PITCH, -body / max(len(spine), 1))  # nose up
        self._add(pose, ["Neck"], _PITCH, 0.4 * body)  # neck more upright, head level again
        self._add(pose, ["Head"], _PITCH, 0.6 * body)
        hip, knee, hock = draw(cfg.hip_flexion), draw(cfg.knee_flexion), draw(cfg.hock_flexion)
        abduction, front = draw(cfg.hip_abduction), draw(cfg.front_leg_pitch)
        for leg, (top, mid, low, _) in LEG_JOINTS.items():
            if "front" in leg:  # undo the trunk pitch so the front legs point down
                self._add(pose, [top], _PITCH, body + front)
                continue
            self._add(pose, [top], _PITCH, -hip)
            self._add(pose, [top], _ROLL, abduction if leg.startswith("left") else -abduction)
            self._add(pose, [mid], _PITCH, knee)
            self._add(pose, [low], _PITCH, -hock)
        self._level_paws(pose)
        return pose
