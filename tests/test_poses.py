"""The seeded pose sampler: config validation, determinism, ranges, layouts, plausibility through lbs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from smplx.lbs import lbs

from prf.body import layout
from prf.body.builtin import build_quadruped
from prf.body.model_data import SMALModelData
from prf.body.poses import DEFAULT_CONFIG, MODE_NAMES, PoseSampler, PoseSamplerConfig, leg_joint_indices

NAMES = list(layout.JOINT_NAMES_35)
IDX = {n: i for i, n in enumerate(NAMES)}
KP = {name: i for i, name in enumerate(layout.KEYPOINT_NAMES)}
PAWS = [KP[n] for n in ("left_front_paw", "right_front_paw", "left_back_paw", "right_back_paw")]


def raw_default() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def only_mode(mode: str, jitter: float | None = None) -> PoseSamplerConfig:
    """The default config with every other mode's probability set to 0."""
    raw = copy.deepcopy(raw_default())
    for name in MODE_NAMES:
        raw["modes"][name]["probability"] = 1.0 if name == mode else 0.0
    if jitter is not None:
        raw["jitter_deg"] = jitter
    return PoseSamplerConfig.model_validate(raw)


def posed_keypoints(data: SMALModelData, poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (B, 26, 3) and vertices (B, V, 3) of poses (B, J, 3) radians through smplx's lbs."""
    b, num_v = poses.shape[0], data.num_vertices
    verts, _ = lbs(
        torch.zeros(b, data.num_betas, dtype=torch.float64),
        torch.tensor(poses.reshape(b, -1)),
        torch.tensor(data.v_template),
        torch.tensor(data.shapedirs),
        torch.tensor(data.posedirs.reshape(num_v * 3, -1).T.copy()),
        torch.tensor(data.j_regressor),
        torch.tensor(data.parents),
        torch.tensor(data.weights),
    )
    v = verts.numpy()
    return np.stack([v[:, g].mean(axis=1) for g in data.keypoint_groups], axis=1), v


def test_default_config_loads_and_modes_are_drawn() -> None:
    config = PoseSamplerConfig.default()
    assert config.probabilities().sum() == pytest.approx(1.0)
    sampler = PoseSampler(config, NAMES)
    poses, modes = sampler.sample_with_modes(300, seed=0)
    assert poses.shape == (300, 35, 3) and np.isfinite(poses).all()
    assert set(modes.tolist()) == set(MODE_NAMES)
    assert not poses[:, 0].any()  # the global orientation is left to the viewpoint
    assert np.abs(poses).max() < np.deg2rad(180)


def test_seeded_determinism() -> None:
    sampler = PoseSampler(PoseSamplerConfig.default(), NAMES)
    a, b = sampler.sample(20, seed=7), sampler.sample(20, seed=7)
    assert np.array_equal(a, b)
    assert not np.allclose(a, sampler.sample(20, seed=8))
    assert np.array_equal(sampler.sample(5, seed=7), a[:5])  # sample i depends only on (seed, i)
    assert sampler.sample(0, seed=7).shape == (0, 35, 3)
    with pytest.raises(ValueError, match=">= 0"):
        sampler.sample(-1, seed=0)


@pytest.mark.parametrize("mode", ["standing", "head_turn", "tail_swing"])
def test_angles_stay_within_configured_ranges(mode: str) -> None:
    raw = raw_default()["modes"][mode]
    jitter = 2.0
    poses = np.rad2deg(PoseSampler(only_mode(mode, jitter), NAMES).sample(200, seed=1))
    eps = 1e-9

    def within(joint: str, axis: int, key: str, slack: float) -> None:
        low, high = raw[key]
        values = poses[:, IDX[joint], axis]
        assert values.min() >= low - slack - eps and values.max() <= high + slack + eps, (joint, key)
        assert values.max() - values.min() > 0.5 * (high - low), (joint, key)  # the range is used

    within("Neck", 2, "neck_yaw", jitter)
    within("Neck", 1, "neck_pitch", jitter)
    within("Head", 2, "head_yaw", jitter)
    within("Head", 1, "head_pitch", jitter)
    within("Tail4", 2, "tail_yaw", jitter / 7)
    within("Tail4", 1, "tail_pitch", jitter / 7)
    within("spine1", 2, "spine_yaw", jitter / 6)
    within("LLeg1", 1, "front_leg_pitch", jitter)
    within("RLegBack1", 1, "back_leg_pitch", jitter)
    assert np.abs(poses[:, IDX["LLeg2"]]).max() <= jitter + eps  # no sampled range, jitter only
    assert np.abs(poses[:, IDX["LLeg1"], 0]).max() <= jitter + eps  # legs never roll beyond the jitter


def test_walking_gait_swings_opposite_legs_in_counter_phase() -> None:
    poses = np.rad2deg(PoseSampler(only_mode("walking", jitter=0.0), NAMES).sample(200, seed=2))
    raw = raw_default()["modes"]["walking"]
    left, right = poses[:, IDX["LLeg1"], 1], poses[:, IDX["RLeg1"], 1]
    assert np.allclose(left, -right)  # half a cycle apart
    assert np.abs(left).max() <= raw["front_stride"][1] + 1e-9
    assert np.abs(poses[:, IDX["LLegBack1"], 1]).max() <= raw["back_stride"][1] + 1e-9
    assert np.corrcoef(left, poses[:, IDX["LLegBack1"], 1])[0, 1] < 0.5  # front and back a quarter apart


def test_walking_and_standing_paws_stay_below_the_body() -> None:
    data = build_quadruped()
    torso = data.part_labels == layout.FINE_PARTS.index("torso")
    for mode in ("walking", "standing"):
        poses = PoseSampler(only_mode(mode), data.joint_names).sample(40, seed=3)
        kp, verts = posed_keypoints(data, poses)
        belly = verts[:, torso, 2].min(axis=1)
        assert (kp[:, PAWS, 2].max(axis=1) < belly - 0.15).all(), mode
        front, back = verts[:, torso, 0].max(axis=1), verts[:, torso, 0].min(axis=1)
        assert (kp[:, PAWS, 0].max(axis=1) < front + 0.15).all()
        assert (kp[:, PAWS, 0].min(axis=1) > back - 0.1).all()
        assert np.allclose(kp[:, PAWS, 2], -0.5, atol=0.08), mode
        # Left paws stay left of the right paws: no leg crosses under the body.
        for end in ("front", "back"):
            gap = kp[:, KP[f"left_{end}_paw"], 1] - kp[:, KP[f"right_{end}_paw"], 1]
            assert (gap > 0.06).all(), (mode, end)


def test_sitting_folds_the_hind_legs_and_lifts_the_front() -> None:
    data = build_quadruped()
    rest, _ = posed_keypoints(data, np.zeros((1, 35, 3)))
    kp, _ = posed_keypoints(data, PoseSampler(only_mode("sitting"), data.joint_names).sample(10, seed=4))
    assert (kp[:, KP["left_back_paw"], 2] > rest[0, KP["left_back_paw"], 2] + 0.15).all()
    assert (kp[:, KP["left_eye"], 2] > rest[0, KP["left_eye"], 2] + 0.12).all()  # trunk pitched up
    assert (kp[:, KP["left_front_paw"], 2] < kp[:, KP["left_shoulder"], 2] - 0.3).all()  # front legs down


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    raw = raw_default()
    raw["modes"]["standing"]["tail_wag_speed"] = [1, 2]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"modes\.standing\.tail_wag_speed"):
        PoseSamplerConfig.from_yaml(path)
    raw = raw_default()
    raw["jiter_deg"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="jiter_deg"):
        PoseSamplerConfig.from_yaml(path)


def test_bad_ranges_and_probabilities_are_errors(tmp_path: Path) -> None:
    raw = raw_default()
    raw["modes"]["walking"]["front_stride"] = [30, 10]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"modes\.walking\.front_stride.*low <= high"):
        PoseSamplerConfig.from_yaml(path)
    raw = raw_default()
    for mode in MODE_NAMES:
        raw["modes"][mode]["probability"] = 0.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="probability"):
        PoseSamplerConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError):
        PoseSamplerConfig.from_yaml(tmp_path / "missing.yaml")


def test_33_joint_layout_skips_the_ears() -> None:
    names33 = list(layout.JOINT_NAMES_33)
    config = PoseSamplerConfig.default()
    p33 = PoseSampler(config, names33).sample(10, seed=5)
    p35 = PoseSampler(config, NAMES).sample(10, seed=5)
    assert p33.shape == (10, 33, 3) and np.isfinite(p33).all()
    assert np.array_equal(p33, p35[:, :33])  # the same draws for the joints both layouts share


def test_leg_joint_indices() -> None:
    legs = leg_joint_indices(NAMES)
    assert legs["left_front_leg"] == [7, 8, 9, 10] and legs["right_front_leg"] == [11, 12, 13, 14]
    assert legs["left_back_leg"] == [17, 18, 19, 20] and legs["right_back_leg"] == [21, 22, 23, 24]
    shuffled = NAMES[::-1]
    assert [shuffled[i] for i in leg_joint_indices(shuffled)["right_back_leg"]] == [
        "RLegBack1",
        "RLegBack2",
        "RLegBack3",
        "RFootBack",
    ]
    with pytest.raises(ValueError, match="SMAL"):
        leg_joint_indices(["root", "hip", "knee"])
