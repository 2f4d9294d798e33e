"""Plain-line training progress (prf.train_progress) for logs that are not a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import RichProgressBar

from prf.train_progress import LineProgress, format_duration, progress_callbacks, total_steps


def _trainer(step: int, **kwargs) -> SimpleNamespace:
    defaults = {
        "global_step": step,
        "max_steps": 4000,
        "max_epochs": 1000,
        "num_training_batches": 148,
        "current_epoch": 3,
        "is_global_zero": True,
        "sanity_checking": False,
        "callback_metrics": {},
    }
    return SimpleNamespace(**{**defaults, **kwargs})


def test_format_duration_and_total_steps() -> None:
    assert [format_duration(s) for s in (12.3, 725, 7300)] == ["12s", "12m05s", "2h01m"]
    assert total_steps(_trainer(0)) == 4000
    assert total_steps(_trainer(0, max_steps=-1, max_epochs=10)) == 1480
    assert total_steps(_trainer(0, max_steps=-1, num_training_batches=float("inf"))) is None


def test_line_progress_prints_every_n_steps_with_speed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 150.0])  # train start, then 50 s later at step 100
    monkeypatch.setattr("prf.train_progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = LineProgress(every_n_steps=100, stream=out)
    progress.on_train_start(_trainer(0), None)
    for step in (1, 99, 100, 100):  # the repeated step (gradient accumulation) prints once
        progress.on_train_batch_end(_trainer(step), None, {"loss": torch.tensor(0.5312)}, None, 0)
    lines = out.getvalue().splitlines()
    assert lines == ["step 100/4000 (2%)  epoch 3  loss 0.5312  2.00 steps/s  ETA 32m30s"]


def test_line_progress_ends_with_the_whole_runs_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 130.0])  # train start, train end 30 s later
    monkeypatch.setattr("prf.train_progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = LineProgress(every_n_steps=100, stream=out)
    progress.on_train_start(_trainer(0), None)
    loader = SimpleNamespace(batch_size=64)
    trainer = _trainer(60, train_dataloader=loader, world_size=2, accumulate_grad_batches=1)
    progress.on_train_end(trainer, None)
    assert out.getvalue() == "trained 60 steps in 30s: 2.00 steps/s, 256 images/s\n"  # 60 x 64 x 2 / 30
    progress.on_train_end(_trainer(60, is_global_zero=False), None)  # other ranks print nothing
    assert out.getvalue().count("\n") == 1


def test_line_progress_reports_validation_metrics_on_rank_zero_only() -> None:
    out = io.StringIO()
    progress = LineProgress(stream=out)
    metrics = {"val/pck_0.15": torch.tensor(0.7931), "val/s_mpjpe": torch.tensor(119.52), "train/loss": 1.0}
    progress.on_validation_end(_trainer(1200, callback_metrics=metrics, is_global_zero=False), None)
    assert out.getvalue() == ""
    progress.on_validation_end(_trainer(1200, callback_metrics=metrics), None)
    assert out.getvalue() == "epoch 3 validation: pck_0.15 0.7931  s_mpjpe 119.5\n"
    with pytest.raises(ValueError, match="every_n_steps"):
        LineProgress(every_n_steps=0)


def test_progress_callbacks_pick_a_live_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress_callbacks(False) == ([], False)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # redirected: not a terminal
    callbacks, live = progress_callbacks(True, every_n_steps=50)
    assert not live and len(callbacks) == 1 and isinstance(callbacks[0], LineProgress)
    assert callbacks[0].every_n_steps == 50
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdout", terminal)
    callbacks, live = progress_callbacks(True)
    assert live and isinstance(callbacks[0], RichProgressBar)


def test_prf_train_shows_info_log_lines_in_the_first_process_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from prf.cli import show_info_logs

    project = logging.getLogger("prf")
    handlers, level = list(project.handlers), project.level
    try:
        for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child: prints nothing of its own
        show_info_logs()
        logging.getLogger("prf.train").info("from rank 1")
        monkeypatch.setenv("LOCAL_RANK", "0")
        show_info_logs()
        show_info_logs()  # a second call adds no second handler
        logging.getLogger("prf.train").info("regressor data: 26 train, 1 val samples")
        assert capsys.readouterr().err == "regressor data: 26 train, 1 val samples\n"
    finally:
        project.handlers[:] = handlers
        project.setLevel(level)  # setLevel also clears the loggers' cached levels
