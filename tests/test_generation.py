"""End-to-end tests of the generation pipeline writing BATCH folders (built-in model, render backend)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from generation.pipeline import failure_effect
from generation.run import export_animal3d, render_pipeline_of_batch, run_generate
from prf.cli import app
from prf.data.animal3d import read_animal3d_json
from prf.data.batch import BatchReader, NotABatchError
from prf.geometry import project_perspective

SIZE = 96


def _generate(out: Path, **settings: object) -> dict[str, int]:
    base: dict[str, object] = {"n": 6, "seed": 3, "image_size": SIZE}
    base.update(settings)
    return run_generate(out, base, workers=2, quiet=True)


@pytest.fixture(scope="module")
def faithful_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "faithful"
    _generate(out)
    return out


def test_batch_is_complete_and_keypoints_reproject(faithful_batch: Path) -> None:
    reader = BatchReader(faithful_batch)
    assert len(reader) == 6
    assert set(reader.manifest["injected_failure"]) == {"none"}
    for image_id in reader.image_ids():
        ann = reader.read_annotation(image_id, num_joints=35, num_betas=6)
        K, R, t = (torch.tensor(np.asarray(getattr(ann.camera, k)), dtype=torch.float64) for k in "KRt")
        kp3d = torch.tensor(ann.keypoints_3d_array())[None]
        kp2d = project_perspective(kp3d, K[None], R[None], t[None])[0].numpy()
        assert np.abs(kp2d - ann.keypoints_2d_array()[:, :2]).max() < 0.5
        image, mask = reader.read_image(image_id), reader.read_mask(image_id)
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert (mask > 0).sum() > 0.02 * SIZE * SIZE, "the animal should cover a visible part of the image"
        x, y, w, h = ann.bbox
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
        assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
        assert reader.read_condition(image_id).shape[2] == 3


def test_same_seed_gives_identical_files(faithful_batch: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _generate(again)
    for sub in ("images", "masks", "conditions", "annotations"):
        for path in sorted((faithful_batch / sub).iterdir()):
            assert path.read_bytes() == (again / sub / path.name).read_bytes(), f"{sub}/{path.name} differs"
    assert (faithful_batch / "manifest.parquet").read_bytes() == (again / "manifest.parquet").read_bytes()


def test_injected_failure_changes_image_but_not_annotation(faithful_batch: Path, tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    _generate(failed, inject_failures=1.0, failure_types=["orientation_flip", "missing_limb", "leg_length"])
    good, bad = BatchReader(faithful_batch), BatchReader(failed)
    assert (bad.manifest["injected_failure"] != "none").all()
    assert (bad.manifest["failure_effect"] > 0).all()
    for image_id in good.image_ids():
        a = json.loads(good.annotation_path(image_id).read_text())
        b = json.loads(bad.annotation_path(image_id).read_text())
        assert a == b, "the annotation must keep the intended state"
        assert np.array_equal(good.read_mask(image_id), bad.read_mask(image_id))
        assert not np.array_equal(good.read_image(image_id), bad.read_image(image_id))
        assert not np.array_equal(good.read_condition(image_id), bad.read_condition(image_id))


def test_a_batch_re_renders_as_recorded_and_hidden_keypoints_add_no_visible_effect(tmp_path: Path) -> None:
    batch = tmp_path / "failed"
    types = ["leg_articulation", "leg_length", "missing_limb"]
    _generate(batch, n=9, inject_failures=1.0, failure_types=types)
    pipeline = render_pipeline_of_batch(batch)
    manifest = BatchReader(batch).manifest.set_index("image_id")
    for index in range(9):
        plan = pipeline.plan(index)
        states = pipeline.render_states(plan)
        recorded = manifest.loc[plan.image_id]
        assert plan.failure == recorded["injected_failure"]
        assert states.effect == pytest.approx(recorded["failure_effect"], abs=1e-6)
        hidden = states.state.hidden_part
        visible = failure_effect(states.truth, states.shown, hidden, visible_only=True)
        if plan.failure == "missing_limb":
            assert hidden is not None and visible == states.effect  # the vanished limb's area: always seen
        else:
            assert 0.0 <= visible <= states.effect + 1e-12
    # a keypoint hidden in both renders may move any distance without adding to the visible effect
    keypoints = states.truth.keypoints_2d.copy()
    keypoints[0, 2] = 0.0
    moved = keypoints.copy()
    moved[0, :2] += 1000.0
    truth = dataclasses.replace(states.truth, keypoints_2d=keypoints)
    shown = dataclasses.replace(states.truth, keypoints_2d=moved)
    assert failure_effect(truth, shown, None) > 10.0
    assert failure_effect(truth, shown, None, visible_only=True) == 0.0
    with pytest.raises(NotABatchError, match=r"is not a BATCH folder"):
        render_pipeline_of_batch(tmp_path)


def test_resume_regenerates_exactly_the_missing_images(faithful_batch: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(faithful_batch, copy)
    ids = BatchReader(copy).image_ids()
    deleted = ids[::2]
    for image_id in deleted:
        (copy / "images" / f"{image_id}.png").unlink()
    counts = _generate(copy)
    assert counts == {"made": len(deleted), "skipped": len(ids) - len(deleted)}
    for image_id in ids:
        assert (copy / "images" / f"{image_id}.png").read_bytes() == (
            faithful_batch / "images" / f"{image_id}.png"
        ).read_bytes()


def test_shards_partition_the_batch(tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    first = run_generate(out, {"n": 5, "seed": 3, "image_size": 64}, shard=(0, 2), quiet=True)
    second = run_generate(out, {"n": 5, "seed": 3, "image_size": 64}, shard=(1, 2), quiet=True)
    assert first["made"] + second["made"] == 5
    manifest = BatchReader(out).manifest
    assert sorted(manifest["image_id"]) == [f"{k:08d}" for k in range(5)]
    assert set(manifest["shard"]) == {"0/2", "1/2"}


def test_bad_config_fails_before_work(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="failure"):
        run_generate(out, {"n": 2, "failure_types": ["wings"]}, quiet=True)
    with pytest.raises(ValueError, match="unknown category"):
        run_generate(out, {"n": 2, "categories": ["dragon"]}, quiet=True)
    with pytest.raises(ValueError, match="invalid generation settings: unknown key 'colour'"):
        run_generate(out, {"n": 2, "colour": "red"}, quiet=True)
    with pytest.raises(ValueError, match="family_data is the shape-family file of a SMAL model"):
        run_generate(out, {"n": 2, "family_data": str(tmp_path)}, quiet=True)
    with pytest.raises(ValueError, match="the diffusers backend makes its own"):
        run_generate(out, {"n": 2, "backend": "diffusers", "style": "standin"}, quiet=True)
    with pytest.raises(ValueError, match=r"takes no --model-path \(backend_options\.base_model"):
        run_generate(out, {"n": 2, "backend_options": {"base_model": "x"}}, quiet=True)
    with pytest.raises(ValueError, match=r"--animal3d-json .* is a folder"):
        run_generate(out, {"n": 2}, quiet=True, animal3d_json=tmp_path)
    assert not out.exists()


def test_generate_options_override_the_config_file_only_when_given(tmp_path: Path) -> None:
    config = tmp_path / "generation.yaml"
    config.write_text(f"n: 3\nseed: 5\nimage_size: {SIZE}\ninject_failures: 1.0\nstyle: standin\n")
    settings = ("n", "seed", "image_size", "inject_failures", "style")
    for name, extra, expected in (
        ("from_file", [], (3, 5, SIZE, 1.0, "standin")),
        ("options_win", ["--n", "2", "--seed", "7", "--style", "synthetic"], (2, 7, SIZE, 1.0, "synthetic")),
    ):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["generate", str(out), "--config", str(config), *extra])
        assert result.exit_code == 0, result.output
        generator = json.loads((out / "batch.json").read_text())["generator"]
        assert tuple(generator[key] for key in settings) == expected, name
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- n: 3\n")
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "x"), "--config", str(not_a_mapping)])
    assert result.exit_code == 2 and "must be a YAML mapping" in " ".join(result.output.split())


def test_animal3d_export_reads_back(faithful_batch: Path, tmp_path: Path) -> None:
    path = export_animal3d(faithful_batch, tmp_path / "set" / "train.json")
    loaded = read_animal3d_json(path, num_joints=35)
    assert not loaded.errors and len(loaded.entries) == 6
    first = loaded.annotations[0]
    assert (path.parent / first.img_path).exists()
    assert "NOT Animal3D" in json.loads(path.read_text())["info"]["description"]


def test_tiny_diffusers_pipeline_writes_a_valid_batch(tmp_path: Path) -> None:
    from tiny_diffusers import build_tiny_diffusers

    tiny = build_tiny_diffusers(tmp_path / "weights")
    out = tmp_path / "diffusion"
    options = {
        "base_model": str(tiny.base),
        "controlnet_model": str(tiny.controlnet),
        "num_inference_steps": 2,
    }
    counts = run_generate(
        out,
        {"n": 3, "seed": 1, "image_size": 80, "backend": "diffusers", "backend_options": options},
        quiet=True,
    )
    assert counts["made"] == 3
    reader = BatchReader(out)
    assert set(reader.manifest["backend"]) == {"diffusers"}
    for image_id in reader.image_ids():
        image = reader.read_image(image_id)
        # the model works at the condition's size (64 px); the picture comes back in the annotation's frame
        assert image.shape == (80, 80, 3) and image.std() > 0
        assert reader.read_condition(image_id).shape == (64, 64, 3)
        ann = reader.read_annotation(image_id)
        assert ann.backend == "diffusers" and ann.prompt and ann.prompt.startswith("An image of")
    assert reader.metadata["backend"]["num_inference_steps"] == 2


def test_device_shards_cover_the_machine_shard_exactly() -> None:
    from generation.multi_device import device_shards

    for shard in ((0, 1), (1, 3)):
        for devices in (1, 2, 4):
            covered = sorted(k for j, n in device_shards(shard, devices) for k in range(60) if k % n == j)
            assert covered == [k for k in range(60) if k % shard[1] == shard[0]]


def test_device_workers_get_the_visible_gpus_and_a_foreign_batch_is_refused_first(
    faithful_batch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from generation.multi_device import check_same_batch, visible_devices
    from generation.run import validated_settings

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,7")
    assert visible_devices(2) == ["4", "6"]
    with pytest.raises(ValueError, match="makes only 3 GPU"):
        visible_devices(4)
    recorded = json.loads((faithful_batch / "batch.json").read_text())["generator"]
    check_same_batch(faithful_batch, validated_settings(recorded)[0])  # the same settings: resumable
    with pytest.raises(ValueError, match=r"other generator settings .*n: 6 in the existing batch, 7 now"):
        check_same_batch(faithful_batch, validated_settings({**recorded, "n": 7})[0])


def test_two_device_workers_write_the_same_batch_as_one_process(faithful_batch: Path, tmp_path: Path) -> None:
    from generation.multi_device import run_generate_devices

    out = tmp_path / "two"
    counts = run_generate_devices(out, {"n": 6, "seed": 3, "image_size": SIZE}, (0, 1), devices=2, quiet=True)
    assert counts == {"made": 6, "skipped": 0}
    manifest = BatchReader(out).manifest
    assert sorted(manifest["image_id"]) == BatchReader(faithful_batch).image_ids()
    assert set(manifest["shard"]) == {"0/2", "1/2"}
    # Across processes BLAS may pick other kernels (memory alignment, thread state), so float32 values can
    # differ in the last bit: annotations match to float32 rounding, pictures to a few edge pixels.
    for path in sorted((faithful_batch / "annotations").iterdir()):
        other = out / "annotations" / path.name
        _assert_same_json(json.loads(path.read_text()), json.loads(other.read_text()), path.name)
    for sub in ("images", "masks"):
        for path in sorted((faithful_batch / sub).iterdir()):
            one, two = (np.asarray(Image.open(p)) for p in (path, out / sub / path.name))
            assert one.shape == two.shape, f"{sub}/{path.name}"
            differs = (one != two).reshape(one.shape[0], one.shape[1], -1).any(axis=-1)
            assert differs.mean() < 0.002, f"{sub}/{path.name}: {differs.sum()} pixels differ"


def _assert_same_json(a: object, b: object, where: str = "") -> None:
    """Equal JSON trees, floats to float32 rounding (relative 1e-5, absolute 1e-6)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_json(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def test_image_format_jpg_writes_jpegs_with_the_same_annotations(
    faithful_batch: Path, tmp_path: Path
) -> None:
    out = tmp_path / "jpeg"
    args = ["generate", str(out), "--n", "6", "--seed", "3", "--image-size", str(SIZE)]
    args += ["--image-format", "jpg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    png, jpeg = BatchReader(faithful_batch), BatchReader(out)
    assert json.loads((out / "batch.json").read_text())["generator"]["image_format"] == "jpg"
    for image_id in png.image_ids():
        assert (out / "images" / f"{image_id}.jpg").exists()
        assert not (out / "images" / f"{image_id}.png").exists()
        png_ann = png.read_annotation(image_id).model_dump()
        jpeg_ann = jpeg.read_annotation(image_id).model_dump()
        assert jpeg_ann.pop("img_path") == f"images/{image_id}.jpg"
        png_ann.pop("img_path")
        assert jpeg_ann == png_ann
        np.testing.assert_array_equal(jpeg.read_mask(image_id), png.read_mask(image_id))  # masks stay PNG
        difference = np.abs(jpeg.read_image(image_id).astype(int) - png.read_image(image_id).astype(int))
        assert difference.mean() < 3.0, f"{image_id}: JPEG should differ from the PNG by a few grey levels"
    bad = CliRunner().invoke(app, ["generate", str(tmp_path / "bad"), "--n", "1", "--image-format", "gif"])
    assert bad.exit_code != 0 and "image_format" in bad.output
    assert not (tmp_path / "bad").exists()


def test_poses_from_a_table_file_and_clear_errors_for_bad_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = tmp_path / "poses.json"  # an Animal3D-style list of poses (35 joints x 3, radians)
    table.write_text(
        json.dumps({"data": [{"pose": (0.1 * rng.standard_normal(105)).tolist()} for _ in range(3)]})
    )
    out = tmp_path / "batch"
    run_generate(out, {"n": 2, "seed": 1, "image_size": SIZE, "poses": str(table)}, quiet=True)
    source = json.loads((out / "batch.json").read_text())["pose_source"]
    assert source["kind"] == "table" and source["count"] == 3 and len(BatchReader(out).image_ids()) == 2
    np.savez(tmp_path / "empty.npz", pose=np.zeros((0, 105)))
    for name, text, message in (
        ("no_pose.json", {"data": [{"x": 1}]}, "no entry has a field 'pose'"),
        ("text.json", {"data": [{"pose": ["abc"] * 105}]}, "field 'pose' must hold lists of numbers"),
        ("ragged.json", {"data": [{"pose": [0.0] * 105}, {"pose": [0.0] * 3}]}, "mixed lengths"),
        ("empty.npz", None, "field 'pose' holds no poses"),
    ):
        path = tmp_path / name
        if text is not None:
            path.write_text(json.dumps(text))
        with pytest.raises(ValueError, match=message) as caught:
            run_generate(
                tmp_path / f"out_{name}", {"n": 1, "image_size": SIZE, "poses": str(path)}, quiet=True
            )
        assert str(path) in str(caught.value)
