"""Training stages end to end on a tiny generated batch: fast_dev_run of every stage and both heads,
config validation, resuming from last.ckpt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import prf.train as train_module
from generation.run import run_generate
from prf.body.smal import SMAL
from prf.checkpoint import load_export, sha256_file
from prf.data import datamodule
from prf.data.batch import BatchReader
from prf.data.datamodule import RegressorDataModule, RegressorDataset, batch_entries, split_indices
from prf.models.heads import build_regressor_net, freeze_unreachable_parameters
from prf.models.losses import LossConfig, loss_outputs
from prf.train import load_train_config, parse_overrides, run_train

TINY_HEADS = {
    "pare": {"hidden": 32, "num_part_channels": 16, "feature_channels": 8, "pose_hidden": 8},
    "hmr": {"hidden": 32},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 10-image BATCH (some injected failures) and its Animal3D-format copy (the fine-tuning stand-in)."""
    root = tmp_path_factory.mktemp("train")
    batch, json_path = root / "batch", root / "standin.json"
    settings = {"n": 10, "seed": 3, "image_size": 64, "inject_failures": 0.3}
    run_generate(batch, settings, workers=1, animal3d_json=json_path, quiet=True)
    return {"batch": batch, "json": json_path, "root": root}


def _config(root: Path, arch: str, **trainer: object) -> Path:
    config = {
        "batch_size": 2,
        "data": {"val_fraction": 0.3},
        "model": {
            "arch": arch,
            "backbone": "regnetx_002",
            "out_index": -2,
            "input_size": 32,
            "head": TINY_HEADS[arch],
        },
        "augment": {"rotation_deg": 20.0},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "progress_bar": False,
            "num_threads": 1,
            "log_every_n_steps": 1,
            **trainer,
        },
    }
    path = root / f"config-{arch}-{len(trainer)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("arch", ["pare", "hmr"])
def test_fast_dev_run_synthetic(data: dict[str, Path], tmp_path: Path, arch: str) -> None:
    config = _config(data["root"], arch, fast_dev_run=True)
    export = run_train("synthetic", data["batch"], config, run_dir=tmp_path / "run")
    payload = torch.load(export, weights_only=True)
    assert payload["stage"] == "synthetic" and payload["arch"] == arch and payload["input_size"] == 32
    assert set(payload["metrics"]) >= {"pa_mpjpe", "s_mpjpe", "pck_0.1", "pck_0.15"}
    assert (tmp_path / "run" / "export.pt.sha256").read_text().split()[0] == sha256_file(export)


def test_fast_dev_run_pretrain_then_finetune_from_its_export(data: dict[str, Path], tmp_path: Path) -> None:
    config = _config(data["root"], "pare", fast_dev_run=True)
    pretrain = run_train("pretrain", [data["batch"]], config, run_dir=tmp_path / "pretrain")
    with pytest.raises(ValueError, match="--init"):
        run_train("finetune", data["json"], config, run_dir=tmp_path / "finetune")
    finetune = run_train("finetune", data["json"], config, init=pretrain, run_dir=tmp_path / "finetune")
    before, after = load_export(pretrain), load_export(finetune)
    assert after["stage"] == "finetune" and after["config"]["init"] == str(pretrain)
    # The fine-tuned weights started from the pretrain export and moved by one step.
    key = next(k for k in before["state_dict"] if k.endswith("weight"))
    assert not torch.equal(before["state_dict"][key], after["state_dict"][key])
    assert (before["state_dict"][key] - after["state_dict"][key]).abs().max() < 0.1
    # An --init with another head is refused with a clear message.
    with pytest.raises(ValueError, match="same model settings"):
        run_train("finetune", data["json"], _config(data["root"], "hmr", fast_dev_run=True), init=pretrain)


def test_resume_from_last_checkpoint(data: dict[str, Path], tmp_path: Path) -> None:
    config = _config(data["root"], "hmr", max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    run_dir = tmp_path / "run"
    first = load_export(run_train("synthetic", data["batch"], config, run_dir=run_dir))
    assert (run_dir / "last.ckpt").is_file() and first["steps_trained"] == 1
    second = load_export(
        run_train("synthetic", data["batch"], config, run_dir=run_dir, overrides={"trainer.max_epochs": 2})
    )
    assert second["steps_trained"] == 2 and second["epochs_trained"] == 2
    # Checkpoints are written at every epoch end (not only when training ends), so a killed run resumes.
    assert [p.name for p in run_dir.glob("epoch=*.ckpt")] == ["epoch=0001.ckpt"]
    with pytest.raises(ValueError, match=r"another config \(optim.lr"):
        run_train("synthetic", data["batch"], config, run_dir=run_dir, overrides={"optim.lr": 0.5})
    # the finished run run again trains nothing and leaves its export byte for byte
    export = run_dir / "export.pt"
    before = sha256_file(export)
    run_train("synthetic", data["batch"], config, run_dir=run_dir, overrides={"trainer.max_epochs": 2})
    assert sha256_file(export) == before
    # a quick check (fast_dev_run) would overwrite the run's config and export: it needs a new folder
    with pytest.raises(ValueError, match="needs a new --run-dir"):
        run_train(
            "synthetic", data["batch"], config, run_dir=run_dir, overrides={"trainer.fast_dev_run": True}
        )
    assert sha256_file(export) == before


def test_trainer_settings_and_empty_validation_are_errors_before_training(
    data: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(data["root"], "hmr", max_epochs=1, limit_train_batches=1)
    run_dir = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"trainer settings \(trainer\.accelerator='cpu', trainer\.devices='foo'"
    ):
        run_train("synthetic", data["batch"], config, run_dir=run_dir, overrides={"trainer.devices": "foo"})
    assert not run_dir.exists()
    failures = data["root"] / "failures_only"
    run_generate(
        failures, {"n": 3, "seed": 4, "image_size": 64, "inject_failures": 1.0}, workers=1, quiet=True
    )
    with pytest.raises(ValueError, match="no faithful validation samples"):
        run_train("synthetic", data["batch"], config, run_dir=run_dir, val_data=[failures])


def test_checkpoints_every_epoch_when_validating_less_often(data: dict[str, Path], tmp_path: Path) -> None:
    # The paper configs validate every 10 epochs; a kill between validations must not lose those epochs.
    config = _config(data["root"], "hmr", max_epochs=2, limit_train_batches=1, check_val_every_n_epoch=10)
    run_dir = tmp_path / "run"
    run_train("synthetic", data["batch"], config, run_dir=run_dir)
    assert [p.name for p in run_dir.glob("epoch=*.ckpt")] == ["epoch=0001.ckpt"]


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown key 'model\.backbon'"):
        load_train_config("synthetic", overrides={"model.backbon": "resnet18"})
    with pytest.raises(ValueError, match=r"'trainer\.max_epochs'"):
        load_train_config("synthetic", overrides={"trainer.max_epochs": 0})
    with pytest.raises(ValueError, match="unknown stage"):
        load_train_config("warmup")
    with pytest.raises(ValueError, match="family_data is the shape-family file of a SMAL model: set smal"):
        load_train_config("synthetic", overrides={"family_data": "family.pkl"})
    assert parse_overrides(["optim.lr=1e-4", "trainer.devices=2"]) == {"optim.lr": 1e-4, "trainer.devices": 2}
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        parse_overrides(["optim.lr"])
    for stage in ("synthetic", "pretrain", "finetune"):
        default = load_train_config(stage)
        assert default.model.backbone == "regnetx_002" and default.model.skip_index == -3
        paper = Path(__file__).resolve().parents[1] / "prf" / "configs" / f"train_paper_{stage}.yaml"
        cfg = load_train_config(stage, paper)
        assert cfg.model.input_size == 224 and cfg.model.backbone in ("resnet50", "hrnet_w32")
        # every packaged PARE config predicts the 26 keypoints PCK is computed on
        assert default.model.head["num_keypoints"] == cfg.model.head["num_keypoints"] == 26
        # --arch hmr on a packaged (PARE) config: the HMR head starts from its own defaults
        switched = load_train_config(stage, paper, {"model.arch": "hmr", "model.head.hidden": 64})
        assert switched.model.arch == "hmr" and switched.model.head == {"hidden": 64}
    # a head option the chosen head does not take is an error naming it, before anything is built
    with pytest.raises(ValueError, match=r"pare head has no option 'model\.head\.iterations'; it takes"):
        load_train_config("synthetic", overrides={"model.head.iterations": 2})
    with pytest.raises(ValueError, match=r"hmr head has no option 'model\.head\.num_keypoints'"):
        load_train_config("synthetic", overrides={"model.arch": "hmr", "model.head.num_keypoints": 26})


def test_datamodule_split_is_seeded_and_uses_faithful_rows(data: dict[str, Path]) -> None:
    train_a, val_a = split_indices(20, 0.25, seed=7)
    train_b, _ = split_indices(20, 0.25, seed=7)
    assert train_a.tolist() == train_b.tolist() and len(val_a) == 5 and not set(train_a) & set(val_a)
    smal = SMAL.builtin()
    dm = RegressorDataModule(
        [data["batch"]], None, 32, 2, joint_names=smal.joint_names, num_betas=smal.num_betas, val_fraction=0.3
    )
    dm.setup()
    manifest = BatchReader(data["batch"]).manifest
    faithful = int((manifest["injected_failure"] == "none").sum())
    assert faithful < len(manifest)
    assert len(dm.train_set) + len(dm.val_set) == faithful
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["pose"].shape == (2, 35, 3, 3)


def test_decoded_cache_gives_the_same_items_and_reads_each_file_once(
    data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    smal = SMAL.builtin()
    entries = batch_entries(data["batch"])
    plain = RegressorDataset(entries, 32, smal.joint_names, smal.num_betas)
    cached = RegressorDataset(entries, 32, smal.joint_names, smal.num_betas, cache=True)
    reads: list[Path] = []
    original = datamodule.read_image_rgb
    monkeypatch.setattr(datamodule, "read_image_rgb", lambda path: reads.append(path) or original(path))
    for _ in range(2):  # two epochs
        for i in range(len(entries)):
            a, b = plain[i], cached[i]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(reads) == 3 * len(entries)  # plain read twice, cached once
    sample = cached.decoded(0)
    with pytest.raises(ValueError, match="read-only"):
        sample.targets.pose[0, 0, 0] = 2.0  # shared by every epoch: augmentation must copy, never edit


def test_levels_a_backbone_computes_but_does_not_return_are_frozen() -> None:
    """HRNet's features model runs an "incre" module on every branch and returns only the chosen level:
    those parameters get no gradient, which DDP refuses, so training freezes them (and only them)."""
    smal = SMAL.builtin()
    hrnet = build_regressor_net(
        "pare", "hrnet_w18_small", smal.num_joints, smal.num_betas, out_index=-2, **TINY_HEADS["pare"]
    )
    frozen = freeze_unreachable_parameters(hrnet, 64)
    assert frozen and all(name.startswith("backbone.") for name in frozen)
    assert any(".incre_modules.0." in name for name in frozen)
    assert hrnet.training  # the probe's eval mode is undone
    out = hrnet(torch.randn(2, 3, 64, 64))
    outputs = (out.pose_rotmat, out.betas, out.cam, out.part_logits, out.attention)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in hrnet.parameters() if p.requires_grad)
    regnet = build_regressor_net("pare", "regnetx_002", smal.num_joints, smal.num_betas, out_index=-2)
    assert freeze_unreachable_parameters(regnet, 64) == []


def test_a_run_from_before_the_freeze_resumes(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose last.ckpt was written when nothing was frozen (an older prf) resumes with the branch
    it would now freeze still trainable; a checkpoint whose optimiser fits neither is a clear error."""
    config = _config(data["root"], "pare", max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    off = {"model.head.num_keypoints": 26, "loss.keypoints_detected": 0.0, "loss.keypoint_heatmaps": 0.0}
    run_dir = tmp_path / "run"
    with monkeypatch.context() as older:
        older.setattr(train_module, "freeze_unreachable_parameters", lambda *args: [])
        run_train("synthetic", data["batch"], config, run_dir=run_dir, overrides=off)
    with caplog.at_level("WARNING", logger="prf.train"):
        resumed = run_train(
            "synthetic", data["batch"], config, run_dir=run_dir, overrides={**off, "trainer.max_epochs": 2}
        )
    assert load_export(resumed)["steps_trained"] == 2
    assert "written before prf froze the 2 parameter tensors" in caplog.text
    # an optimiser state that matches neither way of counting
    last = run_dir / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    checkpoint["optimizer_states"][0]["param_groups"][0]["params"].pop()
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match=r"cannot resume .*last\.ckpt: its optimiser holds"):
        run_train(
            "synthetic", data["batch"], config, run_dir=run_dir, overrides={**off, "trainer.max_epochs": 3}
        )


def test_a_branch_whose_loss_terms_are_off_is_frozen() -> None:
    smal = SMAL.builtin()
    head = {**TINY_HEADS["pare"], "num_keypoints": 26}
    on = loss_outputs(LossConfig())
    off = loss_outputs(LossConfig(keypoints_detected=0.0, keypoint_heatmaps=0.0))
    assert "keypoints_2d" in on and "keypoints_2d" not in off and "keypoint_heatmaps" not in off
    net = build_regressor_net("pare", "regnetx_002", smal.num_joints, smal.num_betas, out_index=-2, **head)
    assert freeze_unreachable_parameters(net, 64, on) == []
    assert freeze_unreachable_parameters(net, 64, off) == [
        "head.keypoint_layer.weight",
        "head.keypoint_layer.bias",
    ]


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("pare", {}),
        ("hmr", {}),
        # a keypoint branch with both its loss terms off
        ("pare", {"model.head.num_keypoints": 26, "loss.keypoints_detected": 0.0}),
    ],
)
def test_hrnet_trains_under_ddp(data: dict[str, Path], tmp_path: Path, arch: str, extra: dict) -> None:
    """The paper configs' strategy (DDP) with an HRNet backbone: without the freeze above, DDP stops at
    the second step ("parameters that were not used in producing the loss")."""
    config = _config(data["root"], arch, strategy="ddp", max_steps=2, limit_val_batches=1)
    overrides = {"model.backbone": "hrnet_w18_small", "model.input_size": 64, **extra}
    run = run_train("synthetic", data["batch"], config, run_dir=tmp_path / "run", overrides=overrides)
    export = load_export(run)
    assert export["backbone"] == "hrnet_w18_small" and export["steps_trained"] == 2
