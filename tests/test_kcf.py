"""Tests of the KCF baseline (kcf/): folds, labels and bins, the 3D-DST reader, the fold driver (resume,
the flip signal) and the SCORES layout it shares with ``prf score``.

Everything is tiny and CPU-only: a 16-image generated BATCH at 64 px, timm's ``test_resnet`` at 32 px, two
folds, one thread.
"""

from __future__ import annotations

import datetime
import logging
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from kcf.cli import kcf as kcf_command
from kcf.data import AngleBins, collect_items, rigid_angles
from kcf.folds import (
    TRAIN_SECONDS_KEY,
    FoldStore,
    assign_folds,
    load_fold_module,
    score_fold,
)
from kcf.run import SCORES_COLUMNS, fold_spec, load_config, load_thresholds, run_kcf
from kcf.threedst import read_threedst_annotation
from prf.body.pickle_io import ForbiddenPickleClass
from prf.data.annotation import Annotation
from prf.data.batch import BatchReader
from prf.geometry import look_at
from prf.lightning_quiet import lightning_info_silenced
from prf.score_io import read_provenance, scores_schema

TINY = {
    "model.backbone": "test_resnet",
    "model.out_index": -1,
    "model.input_size": 32,
    "trainer.max_epochs": 1,
    "trainer.progress_bar": False,
    "trainer.num_threads": 1,
    "folds": 2,
    "batch_size": 8,
    "optim.name": "sgd",
    "optim.lr": 0.05,
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-image BATCH (64 px) with orientation flips injected into about half of the images."""
    from generation.run import run_generate

    out = tmp_path_factory.mktemp("kcf") / "batch"
    settings = {"n": 16, "seed": 0, "image_size": 64, "inject_failures": 0.5}
    run_generate(out, {**settings, "failure_types": ["orientation_flip"]}, workers=1, quiet=True)
    return out


@pytest.fixture(scope="module")
def full_run(batch: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted KCF run over the batch."""
    out = tmp_path_factory.mktemp("kcf_full") / "scores.parquet"
    return run_kcf(batch, out, load_config(overrides=TINY))


# ---- folds, labels, bins ---------------------------------------------------------------------------------


def test_folds_cover_every_image_once_and_are_reproducible() -> None:
    ids = [f"img{i:03d}" for i in range(23)]
    folds = assign_folds(ids, 5, seed=7)
    assert sorted(folds) == sorted(ids)  # every image exactly once
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.sum() == 23 and sizes.max() - sizes.min() <= 1
    assert assign_folds(list(reversed(ids)), 5, seed=7) == folds  # same ids and seed -> same folds
    assert assign_folds(ids, 5, seed=8) != folds
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(ids[:3], 5, seed=0)
    with pytest.raises(ValueError, match="unique"):
        assign_folds(["a", "a", "b"], 2, seed=0)


def test_bins_round_trip_and_edges() -> None:
    bins = AngleBins(41)
    rng = np.random.default_rng(0)
    angles = np.stack(
        [rng.uniform(-7, 7, 200), rng.uniform(-1.5, 1.5, 200), rng.uniform(-3.1, 3.1, 200)], axis=1
    )
    indices = bins.to_bins(angles)
    assert indices.min() >= 0 and indices.max() <= 40
    assert np.array_equal(bins.to_bins(bins.centres(indices)), indices)
    width = 2 * math.pi / 41
    assert np.abs(bins.centres(indices)[:, 1] - angles[:, 1]).max() <= width / 2 + 1e-9
    # azimuth wraps: -0.01 rad is in the last bin, 2 pi + 0.01 in the first
    assert bins.to_bins(np.array([[-0.01, 0, 0], [2 * math.pi + 0.01, 0, 0]]))[:, 0].tolist() == [40, 0]
    narrow = AngleBins(41, elevation_range=(-0.5, 0.5))
    assert narrow.to_bins(np.array([[0.0, 1.2, 0.0]]))[0, 1] == 40  # clipped into the last bin


def test_labels_from_viewpoint_and_from_extrinsics_agree(batch: Path) -> None:
    reader = BatchReader(batch)
    annotation = reader.read_annotation(reader.image_ids()[0])
    (az, el, th), source = rigid_angles(annotation)
    assert source == "viewpoint"
    no_viewpoint = annotation.model_copy(update={"viewpoint": None})
    (az2, el2, th2), source2 = rigid_angles(no_viewpoint)
    assert source2 == "extrinsics"
    assert math.isclose(math.remainder(az - az2, 2 * math.pi), 0.0, abs_tol=1e-6)
    assert el == pytest.approx(el2, abs=1e-6) and th == pytest.approx(th2, abs=1e-6)


def test_labels_from_global_orientation_without_camera() -> None:
    """Animal3D: no camera, no viewpoint; camera R = rot(pose[0])."""
    rotation, _ = look_at(1.0, 0.3, 0.1, 2.0)
    rotvec = cv2.Rodrigues(rotation[0].numpy())[0].ravel()
    annotation = Annotation(
        img_path="a.png", bbox=[0, 0, 10, 10], width=10, height=10,
        keypoint_2d=[[0, 0, 1]] * 26, keypoint_3d=[[0, 0, 0]] * 26, pose=[*rotvec, *[0.0] * 102],
        shape=[0.0] * 20, trans=[0, 0, 0], category=0, supercategory=0,
    )  # fmt: skip
    angles, source = rigid_angles(annotation)
    assert source == "extrinsics"
    assert np.allclose(angles, (1.0, 0.3, 0.1), atol=1e-6)


# ---- the 3D-DST layout -----------------------------------------------------------------------------------


def _write_threedst(root: Path, annotations: dict[str, dict], images: list[str]) -> None:
    for relative, payload in annotations.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, payload, allow_pickle=True)
    for relative in images:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)


def test_threedst_reader_labels_ids_and_forbidden_classes(tmp_path: Path) -> None:
    root = tmp_path / "DST" / "train"
    good = {"theta": 1.25, "phi": 1.0, "dist": 3.0, "camera_rotation": 0.0, "principal": np.array([256, 256])}
    _write_threedst(
        root,
        {
            "n02690373/abc/annotation/000.npy": good,
            "n02690373/abc/annotation/001.npy": {"theta": 0.5, "phi": 2.0, "dist": np.float64(1.5)},
            "n02690373/abc/annotation/002.npy": {**good, "when": datetime.date(2020, 1, 1)},
        },
        [
            "n02690373/abc/image_dst/000_00.png",
            "n02690373/abc/image_dst/000_01.png",
            "n02690373/abc/image_dst/001_00.png",
            "n02690373/abc/image_dst/002_00.png",
            "n02690373/abc/image_dst/003_00.png",
            "n02690373/abc/image_render/000.png",
        ],
    )
    label = read_threedst_annotation(root / "n02690373/abc/annotation/000.npy")
    assert label == pytest.approx(
        {"azimuth": 1.25, "elevation": math.pi / 2 - 1.0, "theta": 0.0, "distance": 3.0}
    )
    with pytest.raises(ForbiddenPickleClass, match="datetime"):
        read_threedst_annotation(root / "n02690373/abc/annotation/002.npy")

    items, errors, kind = collect_items(root)
    assert kind == "3d-dst"
    assert [i.image_id for i in items] == [
        "n02690373_abc_000_00",
        "n02690373_abc_000_01",
        "n02690373_abc_001_00",
    ]
    assert items[1].angles == pytest.approx((1.25, math.pi / 2 - 1.0, 0.0))  # sample 01 of render 000
    assert items[2].angles == pytest.approx((0.5, math.pi / 2 - 2.0, 0.0))
    assert items[0].image == "n02690373/abc/image_dst/000_00.png"
    reasons = {e.image_id: e.reason for e in errors}
    assert set(reasons) == {"n02690373_abc_002_00", "n02690373_abc_003_00"}
    assert "datetime.date" in reasons["n02690373_abc_002_00"]  # refused, never constructed
    assert "no such file" in reasons["n02690373_abc_003_00"]
    # the render folder instead of the generated one, and a synset folder as the root
    renders, _, _ = collect_items(root / "n02690373", dst_images="image_render")
    assert [i.image_id for i in renders] == ["n02690373_abc_000"]


# ---- thresholds and the command --------------------------------------------------------------------------


def test_thresholds_file_is_validated(tmp_path: Path) -> None:
    assert load_thresholds(None).thresholds.ce_max == 3.73
    good = tmp_path / "kcf.yaml"
    good.write_text("ce_max: 4.5\ngeodesic_max: 0.5236\n")
    loaded = load_thresholds(good)
    assert loaded.thresholds.geodesic_max == pytest.approx(0.5236) and len(loaded.sha256) == 64
    only_geodesic = tmp_path / "geodesic.yaml"  # a threshold a file leaves out is not checked
    only_geodesic.write_text("geodesic_max: 1.5708\n")
    assert load_thresholds(only_geodesic).thresholds.ce_max is None
    for text, message in (
        ("ce_max: 3.7\nce_maxx: 2\n", "unknown key 'ce_maxx'"),
        ("ce_max: -1\n", "'ce_max'"),
        ("ce_max: null\ngeodesic_max: null\n", "nothing to threshold"),
        ("geodesic_max: 4.0\n", "'geodesic_max'"),
        ("- 1\n", "YAML mapping"),
        ("ce_max: true\n", "'ce_max': Input should be a valid number"),
        ("{}\n", "nothing to threshold"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_thresholds(bad)


def test_command_fails_before_any_work(batch: Path, tmp_path: Path) -> None:
    bad = tmp_path / "kcf.yaml"
    bad.write_text("ce_max: 3.7\nunknown: 1\n")
    out = tmp_path / "scores.parquet"
    with pytest.raises(ValueError, match="unknown key 'unknown'"):
        kcf_command(batch, thresholds=bad, out=out, quiet=True)
    with pytest.raises(ValueError, match="folds are numbered"):
        kcf_command(batch, folds=2, fold=[2], out=out, quiet=True)
    with pytest.raises(ValueError, match=r"unknown key 'model\.backbon'"):
        kcf_command(batch, set_values=["model.backbon=resnet50"], out=out, quiet=True)
    with pytest.raises(FileNotFoundError):
        kcf_command(tmp_path / "missing", out=out, quiet=True)
    # settings only the network or Lightning rejects, also before the work folder is claimed (a claimed
    # folder would refuse the corrected rerun as "another run")
    with pytest.raises(ValueError, match="timm has no model named 'resnet18x'"):
        kcf_command(batch, set_values=["model.backbone=resnet18x"], out=out, quiet=True)
    with pytest.raises(ValueError, match=r"trainer settings \(trainer\.accelerator='nosuchdevice'"):
        kcf_command(batch, set_values=["trainer.accelerator=nosuchdevice"], out=out, quiet=True)
    assert not out.exists() and not (tmp_path / "scores.kcf").exists()


def test_a_config_file_that_leaves_keys_out_gets_the_cpu_defaults(tmp_path: Path) -> None:
    partial = tmp_path / "kcf.yaml"
    partial.write_text("folds: 3\n")
    assert load_config(partial).model_dump() == load_config(overrides={"folds": 3}).model_dump()


def test_command_runs_through_typer(batch: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("kcf")(kcf_command)
    app.command("other")(lambda: None)  # two commands: the app dispatches on "kcf"
    sets = [f"--set={key}={value}" for key, value in TINY.items() if key != "folds"]
    out = tmp_path / "run" / "scores.parquet"
    result = CliRunner().invoke(app, ["kcf", str(batch), "--folds", "2", "--out", str(out), "--quiet", *sets])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / "keep.txt").is_file() and (out.parent / "reject.txt").is_file()
    assert "training time" in result.output
    help_text = CliRunner().invoke(app, ["kcf", "--help"]).output
    for flag in ("--folds", "--thresholds", "--out", "--config", "--fold", "--restart"):
        assert flag in help_text


# ---- the fold driver and SCORES --------------------------------------------------------------------------


def test_scores_have_the_prf_layout(full_run, batch: Path) -> None:
    scores = full_run.scores
    prf_columns = scores_schema(["kcf"]).names
    assert list(scores.columns[:5]) == prf_columns[:5] == ["image_id", "image", "status", "reason", "keep"]
    assert "kcf_keep" in prf_columns and "kcf_keep" in scores.columns
    assert list(scores.columns) == list(SCORES_COLUMNS)
    assert scores["image_id"].tolist() == BatchReader(batch).image_ids()
    assert (scores["status"] == "ok").all()
    assert scores["keep"].equals(scores["kcf_keep"].astype(bool))
    assert scores["kcf_ce"].to_numpy() == pytest.approx(
        scores[["kcf_ce_azimuth", "kcf_ce_elevation", "kcf_ce_theta"]].sum(axis=1).to_numpy()
    )
    assert ((scores["kcf_geodesic"] >= 0) & (scores["kcf_geodesic"] <= math.pi + 1e-9)).all()
    rejected = scores[~scores["keep"]]
    assert (
        rejected["reason"].str.startswith("kcf: ce ").all()
        and (scores.loc[scores["keep"], "reason"] == "").all()
    )
    provenance = read_provenance(full_run.out)
    assert provenance["format"] == "prf-scores" and provenance["models"][0]["name"] == "kcf"
    assert len(provenance["models"][0]["folds"]) == 2
    cost = provenance["cost"]
    assert cost["train_seconds"] > 0 and cost["score_seconds"] > 0
    assert cost["total_seconds"] == pytest.approx(cost["train_seconds"] + cost["score_seconds"])
    kept = full_run.keep_file.read_text().split()
    rejected_paths = full_run.reject_file.read_text().split()
    assert sorted(kept + rejected_paths) == sorted(scores["image"])
    assert set(kept) == set(scores.loc[scores["keep"], "image"])


def test_geodesic_threshold_and_error_rows(batch: Path, full_run, tmp_path: Path) -> None:
    """Re-applying thresholds on finished folds retrains nothing; an unreadable image is an error row."""
    limits = tmp_path / "kcf.yaml"
    limits.write_text("ce_max: 100.0\ngeodesic_max: 0.5\n")
    work = full_run.work_dir
    result = run_kcf(batch, tmp_path / "scores.parquet", load_config(overrides=TINY), limits, work_dir=work)
    assert result.resumed_folds == [0, 1]
    scores = result.scores
    expect = scores["kcf_geodesic"] <= 0.5
    assert scores["keep"].equals(expect)
    assert scores.loc[~expect, "reason"].str.contains("geodesic").all()

    broken = tmp_path / "broken"
    broken.mkdir()
    reader = BatchReader(batch)
    for image_id in reader.image_ids()[:7]:
        Image.open(reader.image_path(image_id)).save(broken / f"{image_id}.png")
        (broken / f"{image_id}.json").write_text(reader.annotation_path(image_id).read_text())
    (broken / f"{reader.image_ids()[0]}.png").write_bytes(b"not a png")
    (broken / f"{reader.image_ids()[1]}.json").write_text("{}")
    result = run_kcf(broken, tmp_path / "broken.parquet", load_config(overrides=TINY))
    rows = result.scores.set_index("image_id")
    first, second = reader.image_ids()[:2]
    assert rows.loc[first, "status"] == "error" and "image" in rows.loc[first, "reason"]
    assert rows.loc[second, "status"] == "error" and "annotation" in rows.loc[second, "reason"]
    # error rows name the image by its absolute path, as scored rows do (and so keep / reject.txt)
    assert rows.loc[second, "image"] == str((broken / f"{second}.png").absolute())
    assert all(Path(line).is_absolute() for line in (tmp_path / "reject.txt").read_text().splitlines())
    assert pd.isna(rows.loc[first, "kcf_ce"]) and not rows.loc[first, "keep"]
    assert (rows["status"] == "ok").sum() == 5


class _KilledError(RuntimeError):
    pass


def test_resume_after_a_killed_fold_matches_an_uninterrupted_run(
    batch: Path, full_run, tmp_path: Path
) -> None:
    cfg = load_config(overrides=TINY)
    out = tmp_path / "scores.parquet"

    def kill_after_first(fold: int) -> None:
        if fold == 0:
            raise _KilledError("simulated kill after fold 0")

    with pytest.raises(_KilledError):
        run_kcf(batch, out, cfg, on_fold_done=kill_after_first)
    store = FoldStore(tmp_path / "scores.kcf")
    assert store.is_done(0) and not store.is_done(1) and not out.exists()
    model_stamp = store.model_path(0).stat().st_mtime_ns
    finished: list[int] = []
    result = run_kcf(batch, out, cfg, on_fold_done=finished.append)
    assert finished == [1] and result.resumed_folds == [0]  # fold 0 was not retrained
    assert store.model_path(0).stat().st_mtime_ns == model_stamp
    pd.testing.assert_frame_equal(result.scores, full_run.scores, check_exact=False, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        run_kcf(batch, out, load_config(overrides={**TINY, "seed": 1}))


def _write_arrow_tree(root: Path, n: int, size: int, seed: int) -> set[str]:
    """A rigid object seen from above: an arrow (filled triangle) pointing along the annotated azimuth,
    in 3D-DST's layout. Every fourth image shows it turned by 180 degrees (an orientation flip) while its
    annotation keeps the intended azimuth. Returns the ids of the flipped images."""
    rng = np.random.default_rng(seed)
    flipped = set()
    for i in range(n):
        model = root / "n0001" / f"m{i % 2}"
        (model / "annotation").mkdir(parents=True, exist_ok=True)
        (model / "image_dst").mkdir(exist_ok=True)
        azimuth = float(rng.integers(4)) * math.pi / 2
        flip = i % 4 == 3
        shown = azimuth + math.pi if flip else azimuth
        if flip:
            flipped.add(f"n0001_m{i % 2}_{i:03d}_00")
        image = np.clip(rng.normal(rng.uniform(40, 120), 15, (size, size, 3)), 0, 255).astype(np.uint8)
        centre, radius = size / 2 + rng.uniform(-2, 2, 2), size * 0.35
        ahead = np.array([math.cos(shown), -math.sin(shown)])
        side = np.array([-ahead[1], ahead[0]])
        corners = [centre + ahead * radius, centre - 0.6 * radius * ahead + 0.5 * radius * side]
        corners.append(centre - 0.6 * radius * ahead - 0.5 * radius * side)
        colour = tuple(int(v) for v in rng.integers(160, 256, 3))
        cv2.fillPoly(image, [np.round(corners).astype(np.int32)], colour)
        Image.fromarray(image).save(model / "image_dst" / f"{i:03d}_00.png")
        annotation = {"theta": azimuth, "phi": math.pi / 2 - 0.2, "dist": 2.0}
        np.save(model / "annotation" / f"{i:03d}.npy", annotation, allow_pickle=True)
    return flipped


def test_flipped_images_score_worse_than_faithful_ones(tmp_path: Path) -> None:
    """After a short training on the other fold, the held-out images whose picture is turned by 180
    degrees get a higher summed cross-entropy and geodesic error than faithful ones, on average.

    The generated animal batches need a few hundred images and minutes before a from-scratch classifier
    tells head from tail (docs/kcf.md); this 96-image arrow batch learns in seconds."""
    root = tmp_path / "arrows"
    flipped = _write_arrow_tree(root, n=96, size=32, seed=0)
    cfg = load_config(overrides={**TINY, "trainer.max_epochs": 10, "model.input_size": 32})
    scores = run_kcf(root, tmp_path / "scores.parquet", cfg).scores
    is_flipped = scores["image_id"].isin(flipped)
    assert is_flipped.sum() == 24
    ce, geodesic = scores["kcf_ce"], scores["kcf_geodesic"]
    assert ce[is_flipped].mean() > ce[~is_flipped].mean() + 0.3
    assert geodesic[is_flipped].mean() > geodesic[~is_flipped].mean() + 0.3


def test_fold_scores_do_not_depend_on_batch_composition(batch: Path, full_run) -> None:
    """Eval-mode scoring: a held-out image's scores are the same scored one at a time or 64 at a time."""
    items, _, _ = collect_items(batch)
    store = FoldStore(full_run.work_dir)
    one_at_a_time = fold_spec(load_config(overrides={**TINY, "score_batch_size": 1}))
    module = load_fold_module(one_at_a_time, store, 0)
    alone, _ = score_fold(one_at_a_time, 0, module, items)
    together, _ = score_fold(fold_spec(load_config(overrides=TINY)), 0, module, items)
    pd.testing.assert_frame_equal(alone, together, check_exact=False, rtol=1e-5, atol=1e-6)
    assert len(alone) == 16 and (alone["error"] == "").all()


class _StopTrainingError(RuntimeError):
    pass


class _KillAfterFirstEpoch(pl.Callback):
    """Raises once, at the end of the first epoch (after last.ckpt is written)."""

    def __init__(self) -> None:
        self.fired = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fired:
            self.fired = True
            raise _StopTrainingError("simulated kill in the middle of fold 0")


def test_resume_in_the_middle_of_a_fold(batch: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides={**TINY, "trainer.max_epochs": 2})
    out = tmp_path / "resumed" / "scores.parquet"
    with pytest.raises(_StopTrainingError):
        run_kcf(batch, out, cfg, callbacks=[_KillAfterFirstEpoch()])
    store = FoldStore(tmp_path / "resumed" / "scores.kcf")
    checkpoint = torch.load(store.last_checkpoint(0), map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0 and not store.model_path(0).exists()
    first_attempt = checkpoint[TRAIN_SECONDS_KEY]
    assert first_attempt > 0
    resumed = run_kcf(batch, out, cfg)
    assert resumed.continued_folds == [0] and resumed.resumed_folds == []
    assert not store.last_checkpoint(0).exists()  # removed once the fold is done
    assert store.train_seconds(0) > first_attempt  # the fold's time counts both attempts
    uninterrupted = run_kcf(batch, tmp_path / "plain" / "scores.parquet", cfg)
    pd.testing.assert_frame_equal(
        resumed.scores.drop(columns="image"), uninterrupted.scores.drop(columns="image"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimiser_is_chosen_by_name(name: str, kind: type) -> None:
    from kcf.model import KCFModule, OptimSettings, build_pose_classifier

    net = build_pose_classifier("test_resnet", 5, -1)
    optim = KCFModule(net, AngleBins(5), OptimSettings(name=name, lr=0.01)).configure_optimizers()
    assert type(optim["optimizer"]) is kind
    with pytest.raises(ValueError, match="name"):
        OptimSettings(name="adam")


def test_lightning_info_is_silenced_only_inside_the_block(caplog: pytest.LogCaptureFixture) -> None:
    """Every fold builds Trainers; their "GPU available" / logging-tip lines and Lightning's internal pytree
    deprecation are dropped, other warnings are not, and the logger's level is back afterwards."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_warn

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        caplog.set_level(logging.INFO, logger=name)  # whatever an earlier test left; restored afterwards
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with lightning_info_silenced("predict returned None"):
            pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
            rank_zero_warn("a warning still shows")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
            rank_zero_warn("predict returned None if it was on purpose")  # one the caller names
        rank_zero_warn("predict returned None outside the block")
    assert [str(w.message) for w in shown] == [
        "a warning still shows",
        "predict returned None outside the block",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("GPU available" in m for m in messages), messages
    caplog.clear()
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert any("GPU available" in r.getMessage() for r in caplog.records)
