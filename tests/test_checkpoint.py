"""Exported checkpoints: weights_only loading, sha256 sidecar, round trip to the Predictor, layout refusal,
and ``evaluate`` on a tiny generated batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from generation.run import run_generate
from prf.body.builtin import build_quadruped
from prf.body.layout import KEYPOINT_FLIP
from prf.body.smal import SMAL
from prf.checkpoint import ChecksumError, LayoutMismatchError, load_export, save_export, sha256_file
from prf.data.datamodule import RegressorDataset, source_entries
from prf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_camera
from prf.evaluate import evaluate, format_result
from prf.models.heads import build_regressor_net
from prf.models.regressor import RegressorModule, batch_metrics
from prf.predictor import Predictor

SIZE = 48
# The default checkpoints' shape: a keypoint branch and the stride-8 level fused in.
HEAD = {"hidden": 32, "num_part_channels": 16, "feature_channels": 8, "pose_hidden": 8, "num_keypoints": 26}


@pytest.fixture(scope="module")
def smal() -> SMAL:
    return SMAL.builtin()


@pytest.fixture(scope="module")
def exported(smal: SMAL, tmp_path_factory: pytest.TempPathFactory) -> tuple[RegressorModule, Path]:
    """A tiny PARE module with non-trivial weights, exported the way ``run_train`` does."""
    torch.manual_seed(0)
    net = build_regressor_net(
        "pare", "regnetx_002", smal.num_joints, smal.num_betas, out_index=-2, skip_index=-3, **HEAD
    )
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    module = RegressorModule(net, smal, input_size=SIZE).eval()
    spec = {"arch": "pare", "backbone": "regnetx_002", "num_joints": smal.num_joints}
    spec.update(num_betas=smal.num_betas, out_index=-2, skip_index=-3, head_kwargs=HEAD)
    path = save_export(
        tmp_path_factory.mktemp("export") / "export.pt",
        module.net,
        net=spec,
        arch="pare",
        backbone="regnetx_002",
        input_size=SIZE,
        crop_scale=1.25,
        projection="perspective",
        normalisation={"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        smal_layout=smal.layout_signature(),
        stage="synthetic",
        name="synthetic-pare",
        config={"model": {"input_size": SIZE}, "data": {"train": [Path("some/batch")]}},
        metrics={"pck_0.15": 0.5},
    )
    return module, path


def test_export_loads_with_weights_only_and_carries_its_metadata(exported: tuple, smal: SMAL) -> None:
    _, path = exported
    payload = torch.load(path, weights_only=True)
    assert payload["smal_layout"] == smal.layout_signature()
    assert payload["config"]["data"]["train"] == ["some/batch"]
    assert payload["normalisation"]["mean"] == list(IMAGENET_MEAN)
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    assert path.with_name("export.pt.sha256").read_text().split() == [sha256_file(path), "export.pt"]
    assert path.stat().st_size < 10 * 2**20


def test_flip_test_averages_the_mirrored_crops_keypoints(exported: tuple) -> None:
    module, path = exported
    predictor = Predictor.from_checkpoint(path)
    assert predictor.flip_test  # on by default for a head with a keypoint branch
    crops = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        plain = module(crops)["keypoints_2d_detected"]
        mirrored = module(crops.flip(-1))["keypoints_2d_detected"][:, list(KEYPOINT_FLIP)]
    mirrored[..., 0] = -mirrored[..., 0]
    got = predictor.predict(crops).keypoints_2d
    assert torch.allclose(got, (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # a left-right symmetric input gives a mirror-symmetric answer
    symmetric = torch.cat([crops[..., : SIZE // 2], crops[..., : SIZE // 2].flip(-1)], dim=-1)
    sym = predictor.predict(symmetric).keypoints_2d
    assert torch.allclose(sym[:, list(KEYPOINT_FLIP), 0], -sym[..., 0], atol=1e-5)


def test_round_trip_gives_the_modules_predictions(exported: tuple, smal: SMAL) -> None:
    module, path = exported
    predictor = Predictor.from_checkpoint(path, flip_test=False)
    assert (predictor.input_size, predictor.name, predictor.projection) == (
        SIZE,
        "synthetic-pare",
        "perspective",
    )
    assert predictor.sha256 == sha256_file(path)
    crops = torch.randn(5, 3, SIZE, SIZE)
    cams = torch.tensor([[80.0, 20.0, 26.0]]).expand(5, 3)
    with torch.no_grad():
        expected = module(crops, cams)
    got = predictor.predict(crops, cams, batch_size=2)
    assert torch.allclose(got.pose_rotmat, expected["pose"], atol=1e-5)
    assert torch.allclose(got.betas, expected["betas"], atol=1e-5)
    assert torch.allclose(got.keypoints_3d, expected["keypoints_3d"], atol=1e-5)
    # the model's 2D keypoints are its heatmaps'; the SMAL projection is kept beside them
    assert torch.allclose(got.keypoints_2d, expected["keypoints_2d_detected"], atol=1e-5)
    assert torch.allclose(got.keypoints_2d_projected, expected["keypoints_2d"], atol=1e-5)
    assert not torch.allclose(got.keypoints_2d, got.keypoints_2d_projected, atol=1e-3)
    detected = expected["keypoints_2d_detected"]
    assert torch.allclose(got.keypoints_2d_crop, (detected + 1) * SIZE / 2 - 0.5, atol=1e-4)
    assert got.keypoints_3d.shape == (5, 26, 3) and len(got) == 5
    with pytest.raises(ValueError, match=r"\(B, 3, 48, 48\)"):
        predictor.predict(torch.zeros(2, 3, 32, 32))


def test_prepare_makes_the_training_crop(exported: tuple, tmp_path: Path) -> None:
    _, path = exported
    predictor = Predictor.from_checkpoint(path)
    image = np.random.default_rng(0).integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    K = np.array([[120.0, 0.0, 49.5], [0.0, 120.0, 39.5], [0.0, 0.0, 1.0]])
    crop, affine, camera = predictor.prepare(image, [20, 10, 50, 40], K)
    assert crop.shape == (3, SIZE, SIZE) and affine.shape == (2, 3)
    assert torch.allclose(camera, torch.as_tensor(crop_camera(K, affine), dtype=torch.float32))
    assert predictor.prepare(image, [20, 10, 50, 40])[2] is None


def test_other_smal_layout_is_refused_with_both_names(exported: tuple) -> None:
    _, path = exported
    data = build_quadruped()
    other = SMAL(dataclasses.replace(data, shapedirs=data.shapedirs[:, :, :4], name="four-beta-quadruped"))
    with pytest.raises(LayoutMismatchError) as info:
        Predictor.from_checkpoint(path, smal=other)
    message = str(info.value)
    assert "builtin-quadruped" in message and "four-beta-quadruped" in message and "num_betas" in message


def test_corrupt_or_foreign_files_are_refused(exported: tuple, tmp_path: Path) -> None:
    _, path = exported
    copy = tmp_path / "export.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / "export.pt.sha256").write_text(path.with_name("export.pt.sha256").read_text())
    with pytest.raises(ChecksumError, match="does not match"):
        load_export(copy)
    foreign = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not an exported PRF regressor"):
        Predictor.from_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        load_export(tmp_path / "missing.pt")


def test_evaluate_on_a_tiny_batch(exported: tuple, smal: SMAL, tmp_path: Path) -> None:
    module, path = exported
    batch = tmp_path / "batch"
    run_generate(batch, {"n": 6, "seed": 11, "image_size": 64, "inject_failures": 0.3}, workers=1, quiet=True)
    result = evaluate(path, batch, batch_size=4, flip_test=False)
    faithful = source_entries(batch, smal.num_joints, "faithful")
    assert result["count"] == len(faithful) == result["count_3d"]
    assert 0.0 <= result["pck_0.15"] <= 1.0 and result["pa_mpjpe"] > 0
    assert evaluate(path, batch, rows="all")["count"] == 6
    assert "PCK@0.15" in format_result(result) and 0.0 <= result["pck_0.15_projected"] <= 1.0
    # evaluate's numbers are the module's own validation metrics on the same crops.
    dataset = RegressorDataset(faithful, SIZE, smal.joint_names, smal.num_betas)
    items = [dataset[i] for i in range(len(dataset))]
    stacked = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    with torch.no_grad():
        values = batch_metrics(module(stacked["image"], stacked["crop_cam"]), stacked, SIZE)
    assert result["pck_0.15"] == pytest.approx(float(values["pck_0.15"].nanmean()), abs=1e-6)
    assert result["pa_mpjpe"] == pytest.approx(float(values["pa_mpjpe"].nanmean()), rel=1e-4)
    # the command, with decode workers and an explicit device, gives the same numbers
    from typer.testing import CliRunner

    from prf.cli import app

    args = ["evaluate", str(path), str(batch), "--batch-size", "4", "--no-flip-test", "--json"]
    ran = CliRunner().invoke(app, [*args, "--device", "cpu", "--workers", "1"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)["pa_mpjpe"] == pytest.approx(result["pa_mpjpe"], rel=1e-6)
    bad = CliRunner().invoke(app, [*args, "--device", "gpu7"])
    assert bad.exit_code == 2 and "--device" in bad.output
