"""Tests for ``prf score``: verdict combination, bad inputs, resume after a kill, config errors first.

The checkpoints here are tiny UNTRAINED regressors (random weights) made in-process: they only exercise
the pipeline; their metrics mean nothing.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import prf.data.shared_refs as shared_refs
import prf.score as score_module
import prf.score_io as score_io
from generation.run import export_animal3d, run_generate
from prf.checkpoint import save_untrained_export
from prf.data.inputs import iter_samples
from prf.score import load_models, score, score_batch
from prf.score_data import CropSpec, collate_items, load_item
from prf.score_io import ScoresMismatchError
from prf.thresholds import ModelThresholds, ThresholdsError, load_thresholds

TINY_PARE = {"hidden": 32, "num_part_channels": 8, "feature_channels": 8, "pose_hidden": 8}
LOOSE = """
models:
  A: {pa_mpjpe_max: 100000, s_mpjpe_max: 100000, pck: {alpha: 0.15, min: 0}}
  B: {pa_mpjpe_max: 100000, s_mpjpe_max: null, pck: {alpha: 0.1, normalization: bbox, min: 0},
      max_keypoint_error_max: 1000}
"""


def save_tiny_checkpoint(path: Path, input_size: int, seed: int) -> Path:
    """An UNTRAINED PARE regressor (regnetx_002 backbone, tiny head) exported like `prf train` does."""
    return save_untrained_export(path, input_size, seed, TINY_PARE, f"untrained-{input_size}px")


@dataclass
class Env:
    root: Path
    batch: Path
    animal3d: Path
    a: Path
    b: Path
    loose: Path


def make_env(root: Path, n: int = 8) -> Env:
    """A small BATCH (64 px, half with injected failures), its Animal3D export, two tiny checkpoints
    with different input sizes (64 and 48 px) and a loose thresholds file."""
    batch = root / "batch"
    run_generate(batch, {"n": n, "seed": 0, "image_size": 64, "inject_failures": 0.5}, workers=1, quiet=True)
    animal3d = export_animal3d(batch, root / "animal3d" / "data.json")
    loose = root / "loose.yaml"
    loose.write_text(LOOSE)
    a = save_tiny_checkpoint(root / "a.pt", 64, 0)
    b = save_tiny_checkpoint(root / "b.pt", 48, 1)
    return Env(root, batch, animal3d, a, b, loose)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("score"))


def scratch_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder made this process's TMPDIR, where each run's list of images to score goes
    (prf.data.shared_refs), so a test can check what is left there."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def run(env: Env, out: Path, source: Path | None = None, **kwargs) -> score_io.ScoreSummary:
    kwargs.setdefault("thresholds_path", env.loose)
    return score(source or env.batch, models=[env.a, env.b], out=out, batch_size=4, quiet=True, **kwargs)


def test_final_verdict_is_intersection_of_model_verdicts_and_union_with_any(env: Env) -> None:
    thresholds = load_thresholds(env.loose)
    models, specs = load_models(thresholds, {"A": env.a, "B": env.b}, torch.device("cpu"), None)
    assert [s.size for s in specs] == [64, 48]  # one crop per model input size, from one decoded image
    batch = collate_items([load_item(ref, specs, 35) for ref in iter_samples(env.batch)])
    rows = score_batch(models, batch, "all")
    a_pa = np.array([r["A_pa_mpjpe"] for r in rows])
    b_s = np.array([r["B_s_mpjpe"] for r in rows])
    assert np.isfinite(a_pa).all() and np.isfinite(b_s).all()
    a_keep = a_pa <= np.median(a_pa)
    for limit in np.sort(b_s):  # the loosest B threshold that mixes the verdicts (>= 3 of 4 patterns)
        if len(set(zip(a_keep, b_s <= limit, strict=True))) >= 3:
            break
    else:
        pytest.fail("no B threshold gives a mixed batch")
    models[0].thresholds = ModelThresholds(pa_mpjpe_max=float(np.median(a_pa)), s_mpjpe_max=None, pck=None)
    models[1].thresholds = ModelThresholds(pa_mpjpe_max=None, s_mpjpe_max=float(limit), pck=None)
    for combine, op in (("all", operator.and_), ("any", operator.or_)):
        rows = score_batch(models, batch, combine)
        got_a = [r["A_keep"] for r in rows]
        got_b = [r["B_keep"] for r in rows]
        assert got_a == list(a_keep) and got_b == list(b_s <= limit)
        assert [r["keep"] for r in rows] == [op(x, y) for x, y in zip(got_a, got_b, strict=True)]
        for row in rows:
            assert ("A: pa_mpjpe" in row["reason"]) == (not row["A_keep"])
            assert ("B: s_mpjpe" in row["reason"]) == (not row["B_keep"])


def oracle_regressor(
    batch: dict[str, Any], specs: list[CropSpec], moved: dict[int, float], axis: int
) -> Callable[..., dict[str, torch.Tensor]]:
    """A stand-in for ``run_regressor`` on ``batch``: it returns the annotation itself (its 3D keypoints,
    and its 2D keypoints in the crop of whichever spec the crops were made with), with keypoint n moved
    by ``moved[n]`` sqrt(mask area) along image ``axis`` (0: x, 1: y). ``moved`` is read on every call."""
    target = batch["keypoints_2d"][:, :, :2].numpy()
    size = np.sqrt(batch["mask_area"].numpy())

    def oracle(net, body, crops, crop_cam=None, flip_test=False):
        k = [spec.size for spec in specs].index(crops.shape[-1])
        image = target.copy()
        for index, offset in moved.items():
            image[:, index, axis] += offset * size
        crop = np.einsum("bij,bnj->bni", batch["affines"][k][:, :, :2].numpy(), image)
        crop += batch["affines"][k][:, None, :, 2].numpy()
        normalised = (crop + 0.5) * 2.0 / crops.shape[-1] - 1.0
        return {"keypoints_3d": batch["keypoints_3d"].float(), "keypoints_2d": torch.as_tensor(normalised)}

    return oracle


def test_an_exact_prediction_scores_perfectly_and_one_moved_leg_is_caught(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole coordinate chain (crop affine, crop pixels, back to image pixels, normalisers) checked
    with an oracle regressor that returns the annotation itself, then with one leg moved in 2D."""
    thresholds = load_thresholds(env.loose)
    models, specs = load_models(thresholds, {"A": env.a, "B": env.b}, torch.device("cpu"), None)
    batch = collate_items([load_item(ref, specs, 35) for ref in list(iter_samples(env.batch))[:4]])
    target = batch["keypoints_2d"][:, :, :2].numpy()
    moved: dict[int, float] = {}
    monkeypatch.setattr(score_module, "run_regressor", oracle_regressor(batch, specs, moved, axis=0))
    for row, kp in zip(score_batch(models, batch, "all"), target, strict=True):
        assert row["A_pa_mpjpe"] < 1e-3 and row["A_s_mpjpe"] < 1e-3 and row["A_pck"] == 100.0
        assert row["B_pck"] == 100.0 and row["A_max_kp_error"] < 1e-6
        np.testing.assert_allclose(np.reshape(row["A_keypoints_2d"], (26, 2)), kp, atol=1e-3)
        np.testing.assert_allclose(np.reshape(row["B_keypoints_2d"], (26, 2)), kp, atol=1e-3)
    moved.update({3: 0.3, 14: 0.3, 8: 0.3})  # the left front leg: paw, wrist, elbow, 0.3 sqrt(A) sideways
    visible = batch["keypoints_2d"][:, :, 2].numpy() > 0
    strict = ModelThresholds(pa_mpjpe_max=108.06, s_mpjpe_max=499.99, pck={"min": 95.83})
    models[0].thresholds = models[1].thresholds = strict
    for row, vis in zip(score_batch(models, batch, "all"), visible, strict=True):
        assert row["A_pck"] == pytest.approx(100.0 * (vis.sum() - vis[[3, 14, 8]].sum()) / vis.sum())
        assert row["A_max_kp_error"] == pytest.approx(0.3 if vis[[3, 14, 8]].any() else 0.0, abs=1e-4)
        assert row["A_pa_mpjpe"] < 1e-3  # the 3D keypoints were not moved: only PCK / max error see it
        if vis[[3, 14, 8]].sum() >= 2:
            assert not row["keep"] and "A: pck" in row["reason"]


def test_corrupt_image_and_broken_annotations_become_error_rows(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(env.batch, bad)
    image = bad / "images" / "00000001.png"
    image.write_bytes(image.read_bytes()[:120])  # truncated
    (bad / "images" / "00000002.png").write_bytes(b"")  # zero bytes
    annotation = bad / "annotations" / "00000003.json"
    data = json.loads(annotation.read_text())
    data["keypoint_3d"] = data["keypoint_3d"][:20]  # wrong length
    annotation.write_text(json.dumps(data))
    (bad / "annotations" / "00000004.json").write_text('{"bbox": [1, 2, NaN, 4]')  # malformed JSON
    (bad / "masks" / "00000005.png").unlink()  # the mask the annotation names is gone ...
    annotation = bad / "annotations" / "00000005.json"
    data = json.loads(annotation.read_text())
    del data["mask_area"]  # ... and its area is not recorded (a batch from before mask_area): unscorable
    annotation.write_text(json.dumps(data))
    summary = run(env, tmp_path / "out" / "scores.parquet", bad)
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet").set_index("image_id")
    errors = table[table["status"] == "error"]
    assert sorted(errors.index) == ["00000001", "00000002", "00000003", "00000004", "00000005"]
    assert "00000001.png: truncated or corrupt" in errors.loc["00000001", "reason"]
    assert "00000002.png: the file is empty" in errors.loc["00000002", "reason"]
    assert "00000003.json: field 'keypoint_3d'" in errors.loc["00000003", "reason"]
    assert "00000004.json" in errors.loc["00000004", "reason"]
    assert "00000005.png: file not found (the mask named by" in errors.loc["00000005", "reason"]
    assert errors[["A_pa_mpjpe", "B_pck"]].isna().all().all() and not errors["keep"].any()
    ok = table[table["status"] == "ok"]
    assert (
        len(ok) == 3 and np.isfinite(ok[["A_pa_mpjpe", "A_s_mpjpe", "B_pck", "B_max_kp_error"]]).all().all()
    )
    assert ok["keep"].all()  # loose thresholds
    assert (summary.total, summary.kept, summary.rejected, summary.errored) == (8, 3, 0, 5)
    keep = (tmp_path / "out" / "keep.txt").read_text().split()
    reject = (tmp_path / "out" / "reject.txt").read_text().split()
    assert sorted(keep) == sorted(ok["image"]) and sorted(reject) == sorted(errors["image"])


def test_recorded_mask_area_spares_the_mask_and_equals_the_counted_one(env: Env, tmp_path: Path) -> None:
    """A BATCH annotation records its mask's area: scoring uses it and never opens the mask (here every
    mask is gone); without the recorded area the mask is decoded and gives the same number."""
    recorded, counted = tmp_path / "recorded", tmp_path / "counted"
    shutil.copytree(env.batch, recorded)
    shutil.copytree(env.batch, counted)
    shutil.rmtree(recorded / "masks")
    for annotation in (counted / "annotations").glob("*.json"):
        data = json.loads(annotation.read_text())
        del data["mask_area"]
        annotation.write_text(json.dumps(data))
    tables = {}
    for name, batch in (("recorded", recorded), ("counted", counted)):
        run(env, tmp_path / name / "scores.parquet", batch)
        tables[name] = pd.read_parquet(tmp_path / name / "scores.parquet").set_index("image_id")
    assert (tables["recorded"]["status"] == "ok").all() and (tables["counted"]["status"] == "ok").all()
    assert (tables["recorded"]["mask_area"] > 0).all()
    pd.testing.assert_series_equal(tables["recorded"]["mask_area"], tables["counted"]["mask_area"])
    metrics = ["A_pck", "A_max_kp_error", "B_pck", "keep"]
    pd.testing.assert_frame_equal(tables["recorded"][metrics], tables["counted"][metrics])


def test_killed_and_rerun_gives_the_uninterrupted_table(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = scratch_tmpdir(tmp_path, monkeypatch)
    whole = tmp_path / "whole" / "scores.parquet"
    run(env, whole)
    out = tmp_path / "resumed" / "scores.parquet"
    real, calls = score_module.score_batch, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C (a SIGKILL is covered by the atomic part files)
        return real(*args, **kwargs)

    monkeypatch.setattr(score_module, "score_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        score(env.batch, env.loose, [env.a, env.b], out, batch_size=3, quiet=True, flush_rows=1)
    assert not out.exists() and len(list(out.with_name("scores.parquet.parts").glob("part-*.parquet"))) == 2
    assert not any(scratch.iterdir())  # the list is removed however the run ends
    monkeypatch.setattr(score_module, "score_batch", real)
    # A kill while merging: renaming the merged file over the output fails; the parts survive.
    real_replace = os.replace

    def replace_dies_on_merge(src, dst):
        if str(src).endswith(".merge.tmp"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_dies_on_merge)
    with pytest.raises(KeyboardInterrupt):
        run(env, out)
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))
    monkeypatch.setattr(os, "replace", real_replace)
    summary = run(env, out)
    assert (summary.scored_now, summary.skipped) == (0, 8)  # the second run had scored the rest
    assert not out.with_name("scores.parquet.parts").exists()
    expected, got = pd.read_parquet(whole), pd.read_parquet(out)
    assert got["image_id"].is_unique and len(got) == 8
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6, atol=1e-4)
    assert run(env, out).scored_now == 0  # a finished table is left alone
    # A kill after the merged file was renamed but before the parts were removed: the rerun de-duplicates.
    parts = out.with_name("scores.parquet.parts")
    parts.mkdir()
    shutil.copy(out, parts / "part-000000.parquet")
    (parts / "run.json").write_text(json.dumps(score_io.read_provenance(out)))
    assert run(env, out).scored_now == 0 and not parts.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out), got)
    assert not any(scratch.iterdir())


def test_a_list_of_images_that_cannot_be_written_fails_before_any_model_is_loaded(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = scratch_tmpdir(tmp_path, monkeypatch)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(score_module, "load_models", no_models)
    monkeypatch.setattr(shared_refs.np, "save", full_disk)  # the offsets, written after every ref
    out = tmp_path / "s" / "scores.parquet"
    expected = (
        r"cannot write .*prf-score-todo-.*offsets\.npy: \[Errno 28\] No space left on device "
        r"\(the list of images to score goes under TMPDIR"
    )
    with pytest.raises(shared_refs.RefsWriteError, match=expected):
        run(env, out)
    assert not any(scratch.iterdir()) and not out.parent.exists()
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(score_module, "load_models", no_models)

    def unreadable_input(path):  # an input that fails while it is listed is not blamed on TMPDIR
        yield from itertools.islice(iter_samples(path), 2)
        raise PermissionError(13, "Permission denied", str(path / "manifest.parquet"))

    monkeypatch.setattr(score_module, "iter_samples", unreadable_input)
    with pytest.raises(PermissionError) as err:
        run(env, out)
    assert not isinstance(err.value, shared_refs.RefsWriteError) and "TMPDIR" not in str(err.value)
    assert not any(scratch.iterdir()) and not out.parent.exists()


def test_scoring_an_animal3d_json_matches_the_batch(env: Env, tmp_path: Path) -> None:
    from_batch = run(env, tmp_path / "b" / "s.parquet", limit=3).out
    # Two DataLoader workers, forked after this process already ran OpenCV and torch (a deadlock once).
    from_json = run(env, tmp_path / "j" / "s.parquet", env.animal3d, limit=3, workers=2).out
    a, b = pd.read_parquet(from_batch), pd.read_parquet(from_json)
    assert list(a["image_id"]) == list(b["image_id"]) and list(a["image"]) == list(b["image"])
    columns = ["A_pa_mpjpe", "A_s_mpjpe", "A_pck", "B_pck", "B_max_kp_error", "mask_area"]
    np.testing.assert_allclose(a[columns].to_numpy(float), b[columns].to_numpy(float), rtol=1e-6)


def test_config_errors_raise_before_any_model_is_loaded(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(score_module.Predictor, "from_checkpoint", no_loading)
    bad = {
        "unknown key": LOOSE.replace("s_mpjpe_max: null", "s_mpjpe_max: null, typo: 1"),
        "wrong type": LOOSE.replace(
            "pa_mpjpe_max: 100000, s_mpjpe_max: 100000", "pa_mpjpe_max: [1], s_mpjpe_max: 1"
        ),
        "no models": "combine: all\n",
    }
    for name, text in bad.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(ThresholdsError, match=str(path)):
            run(env, tmp_path / "o.parquet", thresholds_path=path)
    one_model = tmp_path / "one.yaml"
    one_model.write_text("models:\n  A: {pa_mpjpe_max: 1, s_mpjpe_max: null, pck: null}\n")
    with pytest.raises(ValueError, match=r"--models got 2 checkpoint\(s\) but .* defines 1 model"):
        run(env, tmp_path / "o.parquet", thresholds_path=one_model)
    with pytest.raises(FileNotFoundError, match="checkpoint of model A not found"):
        score(env.batch, env.loose, [tmp_path / "missing.pt", env.b], tmp_path / "o.parquet", quiet=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(env, tmp_path / "o.parquet", tmp_path / "no-such-input")
    assert not (tmp_path / "o.parquet").exists()


def test_rerun_with_other_thresholds_is_refused(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.parquet"
    run(env, out, limit=2)
    other = tmp_path / "other.yaml"
    other.write_text(LOOSE.replace("min: 0}", "min: 5}"))
    monkeypatch.setattr(score_module, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    with pytest.raises(ScoresMismatchError, match="thresholds file sha256"):
        run(env, out, thresholds_path=other)
    with pytest.raises(ScoresMismatchError, match="checkpoints"):
        score(env.batch, env.loose, [env.b, env.a], out, quiet=True)
    provenance = score_io.read_provenance(out)
    assert provenance["thresholds"]["content"] == LOOSE
    assert [m["sha256"] for m in provenance["models"]] == [
        (env.root / f"{n}.pt.sha256").read_text().split()[0] for n in "ab"
    ]


def test_default_workers_decode_inline_on_a_small_cpu() -> None:
    from prf.score import default_workers

    assert default_workers("cpu", cpu_count=2) == 0
    assert default_workers("cpu", cpu_count=16) == 2
    assert default_workers("cuda", cpu_count=2) == 2
    assert default_workers("cuda", cpu_count=6) == 4  # the main process and the pin thread keep two
    assert default_workers("cuda:1", cpu_count=16) == 8


def test_a_device_this_machine_lacks_is_an_error_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from prf.score import usable_device

    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device: Invalid device string"):
        usable_device("gpu7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        usable_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usable_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        usable_device("cuda:2")


def test_default_batch_size_is_larger_on_a_gpu() -> None:
    from prf.score import default_batch_size

    assert default_batch_size("cpu") == 32 and default_batch_size("cuda") == 128
    assert default_batch_size("auto") == (128 if torch.cuda.is_available() else 32)


def test_decoded_images_in_flight_stay_bounded_whatever_the_workers_and_batch_size() -> None:
    from prf.score import IN_FLIGHT_IMAGES, make_loader, prefetch_batches

    assert prefetch_batches(2, 32) == 4  # the CPU defaults: 256 images ahead, as before
    assert prefetch_batches(14, 256) == 1  # the H200 run: 3584 images, not 14 x 4 x 256 = 14 336
    assert prefetch_batches(64, 1024) == 1  # never below one batch per worker
    for workers, batch_size in ((2, 32), (8, 64), (14, 256), (3, 100)):
        ahead = workers * batch_size * prefetch_batches(workers, batch_size)
        assert ahead <= max(IN_FLIGHT_IMAGES, workers * batch_size)
    loader = make_loader([], [], 35, batch_size=256, workers=14, pin=False)
    assert loader.prefetch_factor == 1
