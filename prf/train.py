"""Training stages of the PRF regressors, driven by a small YAML config (``prf train``).

Stages: ``synthetic`` (model A: faithful synthetic BATCH images only), ``pretrain`` (model B part 1: the same
kind of data) and ``finetune`` (model B part 2: starts from the pretrain export, ``--init``, on an
Animal3D-format JSON). Each run folder holds ``config.yaml`` (the resolved config), ``last.ckpt`` (Lightning,
for resuming: re-run with the same ``run_dir``), ``logs/`` (CSV metrics) and, at the end, ``export.pt`` +
``export.pt.sha256`` (``prf.checkpoint``).

Config resolution: the pydantic defaults below <- the YAML file (``--config``, or the stage's packaged
``prf/configs/train_default_<stage>.yaml``) <- ``overrides`` (dotted keys, e.g. ``{"optim.lr": 1e-4}``).
Unknown keys are errors naming the key.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from prf.body.smal import SMAL
from prf.checkpoint import check_layout, load_export, plain, save_export
from prf.config_errors import refused_trainer_settings, validation_message
from prf.data.datamodule import AugmentConfig, RegressorDataModule
from prf.data.transforms import DEFAULT_CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD
from prf.models.heads import (
    build_regressor_net,
    freeze_unreachable_parameters,
    head_options,
    unknown_head_options,
)
from prf.models.losses import LossConfig, loss_outputs
from prf.models.regressor import VAL_METRICS, OptimConfig, RegressorModule
from prf.train_progress import progress_callbacks

logger = logging.getLogger(__name__)

STAGES = ("synthetic", "pretrain", "finetune")
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Keys that may change between a run and its resumption (everything else must match config.yaml).
RESUMABLE_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.fast_dev_run",
    "data.num_workers",
    "data.cache_decoded",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    """Where the data is and how it is split (train defaults to ``--data``)."""

    train: list[str] = Field(default_factory=list)
    val: list[str] = Field(default_factory=list)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_seed: int = 0
    limit: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    crop_scale: float = Field(DEFAULT_CROP_SCALE, gt=0.0)
    mask_size: int | None = Field(None, ge=1)
    # Keep decoded images, masks and annotation arrays in memory after the first epoch (~4 bytes per pixel
    # per image: right for CPU-size sets of small renders, not for millions of full-size images).
    cache_decoded: bool = False


class ModelSection(_Section):
    """Network: head ``arch``, timm ``backbone`` at feature level ``out_index`` (fused with the shallower
    level ``skip_index`` when set), crop side ``input_size``."""

    arch: Literal["pare", "hmr"] = "pare"
    backbone: str = "resnet50"
    out_index: int = -1
    skip_index: int | None = None
    pretrained_path: str | None = None
    input_size: int = Field(224, ge=16)
    projection: Literal["perspective", "weak"] = "perspective"
    head: dict[str, Any] = Field(default_factory=dict)


class TrainerSection(_Section):
    """Lightning Trainer settings."""

    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str | int = "32-true"
    max_epochs: int = Field(100, ge=1)
    max_steps: int = Field(-1, ge=-1)  # -1: no step limit
    log_every_n_steps: int = Field(20, ge=1)
    check_val_every_n_epoch: int = Field(1, ge=1)
    limit_train_batches: float | int | None = Field(None, ge=0)
    limit_val_batches: float | int | None = Field(None, ge=0)
    gradient_clip_val: float | None = None
    deterministic: bool = False
    fast_dev_run: bool | int = False
    num_threads: int | None = Field(None, ge=1)
    progress_bar: bool = True


class TrainConfig(_Section):
    """Everything a training run may change (see the module docstring for how it is resolved)."""

    seed: int = 0
    smal: str | None = None
    family_data: str | None = None
    batch_size: int = Field(64, ge=1)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    trainer: TrainerSection = Field(default_factory=TrainerSection)

    @model_validator(mode="after")
    def _family_data_needs_smal(self) -> TrainConfig:
        if self.family_data is not None and self.smal is None:
            raise ValueError("family_data is the shape-family file of a SMAL model: set smal too")
        return self


def default_config_path(stage: str) -> Path:
    """The packaged CPU default config of a stage."""
    _check_stage(stage)
    return CONFIG_DIR / f"train_default_{stage}.yaml"


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    node = target
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "trainer.devices=2"]`` -> ``{"optim.lr": 0.0001, "trainer.devices": 2}``
    (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key.sub=value (e.g. optim.lr=1e-4)")
        value = yaml.safe_load(text)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        out[key.strip()] = value
    return out


def load_train_config(
    stage: str, config_path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Resolve a TrainConfig: defaults <- YAML file <- dotted ``overrides``. Errors name the bad key."""
    path = Path(config_path) if config_path is not None else default_config_path(stage)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping, got {type(raw).__name__}")
    overrides = overrides or {}
    _drop_other_heads_options(raw, overrides, path)
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(validation_message(err, f"training config ({path})")) from None
    unknown = unknown_head_options(cfg.model.arch, cfg.model.head)
    if unknown:
        raise ValueError(
            f"invalid training config ({path}): the {cfg.model.arch} head has no option "
            + ", ".join(f"'model.head.{key}'" for key in unknown)
            + f"; it takes {', '.join(head_options(cfg.model.arch))}"
        )
    return cfg


def _drop_other_heads_options(raw: dict[str, Any], overrides: dict[str, Any], path: Path) -> None:
    """An override that switches ``model.arch`` (``prf train --arch``) leaves the file's ``model.head``
    behind: those options belong to the file's head (the packaged configs' are PARE's), so the new head
    starts from its own defaults. Options given as overrides (``model.head.*``) still apply."""
    model = raw.get("model")
    if "model.arch" not in overrides or not isinstance(model, dict) or not model.get("head"):
        return
    before = model.get("arch", ModelSection.model_fields["arch"].default)
    if overrides["model.arch"] == before:
        return
    logger.info(
        "%s: model.head holds %s head options; the %s head (--arch) starts from its own defaults",
        path,
        before,
        overrides["model.arch"],
    )
    del model["head"]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _check_resume(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Refuse to resume ``run_dir`` with a config that differs in more than RESUMABLE_KEYS."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    now = _flatten(resolved)
    differing = sorted(
        k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)
    )
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing[:5])
        raise ValueError(
            f"{run_dir} holds a run with another config ({shown}); resume it with the same settings "
            "or choose a new --run-dir"
        )


def _optimised_tensors(checkpoint: Path) -> int:
    """How many parameter tensors the optimiser saved in a Lightning ``checkpoint`` covers."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        groups = saved["optimizer_states"][0]["param_groups"]
        return sum(len(group["params"]) for group in groups)
    except Exception as err:  # an unreadable file, or one Lightning did not write
        raise ValueError(f"cannot resume from {checkpoint}: no readable optimiser state ({err})") from err


def _unfreeze_for_an_older_run(
    last: Path, module: torch.nn.Module, net: torch.nn.Module, frozen: list[str]
) -> list[str]:
    """Resume a run whose ``last.ckpt`` was written by a prf that did not yet freeze ``frozen`` (see
    ``freeze_unreachable_parameters``): its optimiser covers those tensors too, so Lightning could not
    load its state. They never got a gradient in that run, so making them trainable again resumes it
    exactly; only DDP minds such tensors, and such a run could not have trained under DDP. Recognised by
    the count alone (saved = trainable + frozen). Any other mismatch is an error that names the
    checkpoint, before Lightning's own, which does not say why. Returns the tensors still frozen."""
    saved = _optimised_tensors(last)
    trainable = sum(p.requires_grad for p in module.parameters())
    if saved == trainable:
        return frozen
    if saved != trainable + len(frozen):
        raise ValueError(
            f"cannot resume {last}: its optimiser holds {saved} parameter tensors, this run trains "
            f"{trainable}; choose a new --run-dir (or start one from its export with --init)"
        )
    params = dict(net.named_parameters())
    for name in frozen:
        params[name].requires_grad_(True)
    logger.warning(
        "%s was written before prf froze the %d parameter tensors no loss term depends on; they stay "
        "trainable in this run so that it resumes as it began (they get no gradient either way)",
        last,
        len(frozen),
    )
    return []


def _load_init(init: Path, net: torch.nn.Module, smal: SMAL, cfg: TrainConfig) -> None:
    export = load_export(init)
    check_layout(export["smal_layout"], smal.layout_signature(), f"--init {init}")
    spec = export["net"]
    mine = {
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone,
        "out_index": cfg.model.out_index,
        "skip_index": cfg.model.skip_index,
    }
    theirs = {k: spec.get(k) for k in mine}
    if mine != theirs or dict(spec.get("head_kwargs") or {}) != plain(cfg.model.head):
        raise ValueError(
            f"--init {init} holds a {theirs} net with head {spec.get('head_kwargs')}, but this run builds "
            f"{mine} with head {cfg.model.head}: use the same model settings as the pretrain run"
        )
    net.load_state_dict(export["state_dict"])
    if int(export["input_size"]) != cfg.model.input_size:
        logger.warning(
            "--init was trained at %s px, this run uses %s px", export["input_size"], cfg.model.input_size
        )


def run_train(
    stage: str,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    config_path: str | os.PathLike[str] | None = None,
    init: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    val_data: Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """Train one stage and write ``<run_dir>/export.pt``; returns its path.

    Args:
        stage: "synthetic" | "pretrain" | "finetune" (finetune needs ``init``).
        data: training source(s): BATCH folder(s) or an Animal3D-format JSON (replaces ``data.train``).
        config_path: YAML config (default: the stage's packaged CPU default).
        init: an export to start from (required for finetune: the pretrain export).
        arch: "pare" | "hmr", overrides ``model.arch``.
        run_dir: run folder (default ``runs/<stage>-<arch>``); re-running resumes from its last.ckpt.
        overrides: dotted config keys -> values (e.g. ``{"trainer.max_epochs": 3}``).
        val_data: held-out source(s) (replaces ``data.val``; default a seeded split of the training data).
    """
    _check_stage(stage)
    overrides = dict(overrides or {})
    if arch is not None:
        overrides["model.arch"] = arch
    if data is not None:
        sources = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        overrides["data.train"] = [os.fspath(s) for s in sources]
    if val_data is not None:
        overrides["data.val"] = [os.fspath(s) for s in val_data]
    cfg = load_train_config(stage, config_path, overrides)
    if not cfg.data.train:
        raise ValueError("no training data: pass --data (a BATCH folder or an Animal3D-format JSON)")
    if stage == "finetune" and init is None:
        raise ValueError(
            "the finetune stage starts from the pretrain export: pass --init <pretrain run>/export.pt"
        )
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{stage}-{cfg.model.arch}"
    resolved = {"stage": stage, "init": os.fspath(init) if init else None, **plain(cfg.model_dump())}
    last = run_dir / "last.ckpt"
    if cfg.trainer.fast_dev_run and (last.is_file() or (run_dir / "export.pt").is_file()):
        raise ValueError(
            f"{run_dir} holds a run; trainer.fast_dev_run (a quick check that writes config.yaml and "
            "export.pt) needs a new --run-dir"
        )
    resume = last.is_file() and not cfg.trainer.fast_dev_run
    if resume:
        _check_resume(run_dir, resolved)

    pl.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    trainer = _make_trainer(cfg.trainer, run_dir)  # before anything is built: it checks the trainer keys
    smal = SMAL.from_file(cfg.smal, cfg.family_data) if cfg.smal else SMAL.builtin()
    net_spec = {
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone,
        "num_joints": smal.num_joints,
        "num_betas": smal.num_betas,
        "out_index": cfg.model.out_index,
        "skip_index": cfg.model.skip_index,
        "head_kwargs": plain(cfg.model.head),
    }
    net = build_regressor_net(
        cfg.model.arch,
        cfg.model.backbone,
        smal.num_joints,
        smal.num_betas,
        pretrained_path=cfg.model.pretrained_path,
        out_index=cfg.model.out_index,
        skip_index=cfg.model.skip_index,
        **cfg.model.head,
    )
    if init is not None:
        _load_init(Path(init), net, smal, cfg)
    frozen = freeze_unreachable_parameters(net, cfg.model.input_size, loss_outputs(cfg.loss))
    module = RegressorModule(
        net, smal, cfg.loss, cfg.optim, cfg.model.input_size, cfg.model.projection, {"config": resolved}
    )
    if resume and frozen:
        frozen = _unfreeze_for_an_older_run(last, module, net, frozen)
    if frozen:
        logger.info(
            "%d parameter tensors (%s ...) feed none of the outputs the loss reads (feature levels the "
            "backbone computes but does not return, branches whose loss weights are 0): frozen, so DDP "
            "never waits for their gradients",
            len(frozen),
            frozen[0],
        )
    datamodule = RegressorDataModule(
        cfg.data.train,
        cfg.data.val or None,
        cfg.model.input_size,
        cfg.batch_size,
        cfg.data.num_workers,
        cfg.augment,
        joint_names=smal.joint_names,
        num_betas=smal.num_betas,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.data.split_seed,
        mask_size=cfg.data.mask_size,
        crop_scale=cfg.data.crop_scale,
        limit=cfg.data.limit,
        cache=cfg.data.cache_decoded,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    export_path = run_dir / "export.pt"
    trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None)
    if resume and export_path.is_file() and _steps_in_export(export_path) == int(trainer.global_step):
        return export_path  # a finished run run again: nothing trained, its export stays byte for byte
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    scores = {k.removeprefix("val/"): float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        save_export(
            export_path,
            module.net,
            net=net_spec,
            arch=cfg.model.arch,
            backbone=cfg.model.backbone,
            input_size=cfg.model.input_size,
            crop_scale=cfg.data.crop_scale,
            projection=cfg.model.projection,
            normalisation={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            smal_layout=smal.layout_signature(),
            stage=stage,
            name=f"{stage}-{cfg.model.arch}",
            config=resolved,
            metrics={k: v for k, v in scores.items() if k in VAL_METRICS or k == "loss"},
            epochs_trained=int(trainer.current_epoch),
            steps_trained=int(trainer.global_step),
        )
    return export_path


def _steps_in_export(path: Path) -> int | None:
    """The ``steps_trained`` an export records (None when it cannot be read)."""
    try:
        return int(load_export(path)["steps_trained"])
    except Exception:  # an unreadable or older export: write a new one
        return None


def _make_trainer(t: TrainerSection, run_dir: Path) -> pl.Trainer:
    callbacks: list[pl.Callback] = []
    if not t.fast_dev_run:
        callbacks.append(
            # save_top_k=1 without a monitor keeps the newest epoch; last.ckpt is written with it every epoch
            # (with save_top_k=0 Lightning would write last.ckpt only when training ends). At the end of
            # every TRAINING epoch: by default Lightning saves after validation when it validates less often
            # than every epoch, so a run killed between validations (every 10 epochs in the paper configs)
            # would lose up to that many epochs.
            ModelCheckpoint(
                dirpath=run_dir,
                filename="{epoch:04d}",
                save_last=True,
                save_top_k=1,
                save_on_train_epoch_end=True,
            )
        )
    progress, live_bar = progress_callbacks(t.progress_bar, every_n_steps=max(100, t.log_every_n_steps))
    callbacks += progress
    optional = {
        "limit_train_batches": t.limit_train_batches,
        "limit_val_batches": t.limit_val_batches,
        "gradient_clip_val": t.gradient_clip_val,
    }
    keys = ("accelerator", "devices", "strategy", "num_nodes", "precision")
    with refused_trainer_settings("trainer", {key: getattr(t, key) for key in keys}):
        return pl.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            precision=t.precision,
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            log_every_n_steps=t.log_every_n_steps,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            deterministic=t.deterministic,
            fast_dev_run=t.fast_dev_run,
            callbacks=callbacks,
            enable_checkpointing=not t.fast_dev_run,
            logger=CSVLogger(save_dir=run_dir, name="logs"),
            default_root_dir=run_dir,
            enable_progress_bar=live_bar,
            num_sanity_val_steps=0,
            **{k: v for k, v in optional.items() if v is not None},
        )
