"""Failure injection: make the image from a perturbed 3D state while the annotation keeps the intended one.

This mimics what the DSPart paper's human filter rejected in diffusion output: legs articulated differently
or swapped left/right, a wrong leg length, the head / neck turned, the whole animal facing the other way, a
limb missing. Perturbations stay inside the pose ranges the regressors are trained on (a failure far
outside them would be easy to catch and flatter the filter). Off by default; used by tests and benchmarks.

Legend: J joints, NB betas, V vertices. Angles in radians unless a name says degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from prf.body.layout import FINE_PARTS, fine_part_of_joint

FAILURE_TYPES: tuple[str, ...] = (
    "leg_articulation",
    "leg_swap",
    "leg_length",
    "head_turn",
    "orientation_flip",
    "missing_limb",
)
LEGS: tuple[str, ...] = ("left_front_leg", "right_front_leg", "left_back_leg", "right_back_leg")
MIRROR_LEG = {
    "left_front_leg": "right_front_leg",
    "right_front_leg": "left_front_leg",
    "left_back_leg": "right_back_leg",
    "right_back_leg": "left_back_leg",
}


@dataclass
class ImageState:
    """The 3D state an image is rendered from (equal to the annotation's state for faithful images).

    Attributes:
        pose: (J, 3) axis-angle, radians.
        betas: (NB,) shape coefficients.
        leg_scale: optional (leg part name, factor): that leg's vertices are stretched about its hip.
        hidden_part: optional fine part name whose faces are not rendered (a missing limb).
        failure: the injected failure type, "none" for a faithful image.
        severity: in [0, 1], 0 for a faithful image.
    """

    pose: np.ndarray
    betas: np.ndarray
    leg_scale: tuple[str, float] | None = None
    hidden_part: str | None = None
    failure: str = "none"
    severity: float = 0.0
    details: dict[str, object] = field(default_factory=dict)


def leg_joints(joint_names: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
    """Joint indices of each of the four legs (hip first), found by name."""
    legs: dict[str, list[int]] = {leg: [] for leg in LEGS}
    for i, name in enumerate(joint_names):
        part = FINE_PARTS[fine_part_of_joint(name)]
        if part in legs:
            legs[part].append(i)
    missing = [leg for leg, idx in legs.items() if not idx]
    if missing:
        raise ValueError(f"the body model has no joints for {missing}: cannot inject leg failures")
    return legs


def _mirror_axis_angle(aa: np.ndarray) -> np.ndarray:
    """Mirror local rotations across the sagittal (x-z) plane: (ax, ay, az) -> (-ax, ay, -az)."""
    return aa * np.array([-1.0, 1.0, -1.0])


def _compose(aa: np.ndarray, extra: Rotation, pre: bool = True) -> np.ndarray:
    """Compose a local axis-angle rotation with an extra rotation; returns (3,) axis-angle."""
    current = Rotation.from_rotvec(aa)
    return (extra * current if pre else current * extra).as_rotvec()


def inject_failure(
    kind: str,
    pose: np.ndarray,
    betas: np.ndarray,
    joint_names: list[str] | tuple[str, ...],
    severity: float,
    rng: np.random.Generator,
) -> ImageState:
    """Perturb the intended state (pose (J,3), betas (NB,)) into the state the image shows.

    `severity` in [0, 1] scales the perturbation between a noticeable minimum and a strong maximum.
    """
    if kind not in FAILURE_TYPES:
        raise ValueError(f"unknown failure type {kind!r}; choose from {', '.join(FAILURE_TYPES)}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    pose = np.array(pose, dtype=np.float64, copy=True)
    betas = np.array(betas, dtype=np.float64, copy=True)
    state = ImageState(pose=pose, betas=betas, failure=kind, severity=float(severity))
    names = list(joint_names)

    if kind == "leg_articulation":
        legs = leg_joints(names)
        leg = LEGS[rng.integers(len(LEGS))]
        hip, knee = legs[leg][0], legs[leg][min(2, len(legs[leg]) - 1)]
        swing = np.deg2rad(30.0 + 30.0 * severity) * rng.choice([-1.0, 1.0])
        bend = np.deg2rad(20.0 + 40.0 * severity)
        pose[hip] = _compose(pose[hip], Rotation.from_euler("y", swing))
        # bend the lower joint against the swing, as a real leg folds
        pose[knee] = _compose(pose[knee], Rotation.from_euler("y", -np.sign(swing) * bend))
        state.details = {"leg": leg}
    elif kind == "leg_swap":
        legs = leg_joints(names)
        pair = (
            ("left_front_leg", "right_front_leg")
            if rng.random() < 0.5
            else ("left_back_leg", "right_back_leg")
        )
        a, b = legs[pair[0]], legs[pair[1]]
        pose_a, pose_b = pose[a].copy(), pose[b].copy()
        pose[a], pose[b] = _mirror_axis_angle(pose_b), _mirror_axis_angle(pose_a)
        state.details = {"pair": list(pair)}
    elif kind == "leg_length":
        leg = LEGS[rng.integers(len(LEGS))]
        magnitude = 0.25 + 0.25 * severity
        factor = 1.0 + magnitude if rng.random() < 0.5 else 1.0 / (1.0 + magnitude)
        state.leg_scale = (leg, float(factor))
        state.details = {"leg": leg, "factor": float(factor)}
    elif kind == "head_turn":
        neck, head = names.index("Neck"), names.index("Head")
        yaw = np.deg2rad(35.0 + 35.0 * severity) * rng.choice([-1.0, 1.0])
        pitch = np.deg2rad(rng.uniform(-15.0, 15.0))
        pose[neck] = _compose(pose[neck], Rotation.from_euler("zy", [yaw * 0.5, pitch]))
        pose[head] = _compose(pose[head], Rotation.from_euler("z", yaw * 0.5))
        state.details = {"yaw_deg": float(np.rad2deg(yaw))}
    elif kind == "orientation_flip":
        angle = np.pi + np.deg2rad(rng.uniform(-20.0, 20.0) * (1.0 - severity))
        pose[0] = _compose(pose[0], Rotation.from_euler("z", angle))
        state.details = {"turn_deg": float(np.rad2deg(angle))}
    elif kind == "missing_limb":
        leg = LEGS[rng.integers(len(LEGS))]
        state.hidden_part = leg
        state.details = {"leg": leg}
    return state


def stretch_leg(
    vertices: np.ndarray,
    joints: np.ndarray,
    lbs_weights: np.ndarray,
    leg_joint_ids: list[int],
    factor: float,
) -> np.ndarray:
    """Stretch one leg about its hip joint: v' = v + w_leg (factor - 1) (v - hip).

    vertices (V,3) and joints (J,3) are posed, metres; lbs_weights (V,J); w_leg = the summed skinning weight
    of the leg's joints, so the stretch fades smoothly into the body.
    """
    w_leg = lbs_weights[:, leg_joint_ids].sum(axis=1, keepdims=True)
    hip = joints[leg_joint_ids[0]]
    return vertices + w_leg * (factor - 1.0) * (vertices - hip)
