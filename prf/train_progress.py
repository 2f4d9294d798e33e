"""Plain-line training progress for logs that are not a terminal (batch jobs, ``> train.log``).

Rich's progress bar draws nothing useful into a redirected stream, so a cluster job's log would stay empty
until the run ends. ``LineProgress`` prints one line every N optimiser steps (step, epoch, loss, speed,
time left) and one per validation (its metrics), on the global-zero rank only.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

# validation metrics worth a line, in this order (RegressorModule logs them as "val/<name>")
_VAL_METRICS: tuple[str, ...] = ("loss", "pck_0.15", "pck_0.1", "s_mpjpe", "pa_mpjpe")


def format_duration(seconds: float) -> str:
    """12.3 -> "12s", 725 -> "12m05s", 7300 -> "2h01m"."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def total_steps(trainer: Any) -> int | None:
    """The run's last optimiser step: ``max_steps`` when set, else ``max_epochs`` x batches per epoch
    (None when neither is known, e.g. an iterable dataset without a length)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs and batches and batches != float("inf"):
        return int(trainer.max_epochs * batches)
    return None


class LineProgress(pl.Callback):
    """Print ``step 1200/4000 (30%)  epoch 8  loss 0.531  2.9 steps/s  ETA 16m05s`` every
    ``every_n_steps`` optimiser steps and ``epoch 8 validation: loss 0.49  pck_0.15 0.793 ...`` after
    each validation; the speed is over the steps since the previous line. When training ends, one line
    with the whole run's speed."""

    def __init__(self, every_n_steps: int = 100, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._last_step = self._start_step = 0
        self._last_time = self._start_time = 0.0

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step, self._last_time = int(trainer.global_step), time.perf_counter()
        self._start_step, self._start_time = self._last_step, self._last_time

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trained 60 steps in 31s: 1.94 steps/s, 124 images/s`` (every rank's images; the first steps'
        warm-up included): the one speed line a run shorter than ``every_n_steps`` prints."""
        steps = int(trainer.global_step) - self._start_step
        if not trainer.is_global_zero or steps <= 0:
            return
        seconds = max(time.perf_counter() - self._start_time, 1e-9)
        line = f"trained {steps} steps in {format_duration(seconds)}: {steps / seconds:.2f} steps/s"
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        if batch_size:
            world = int(getattr(trainer, "world_size", 1) or 1)
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            line += f", {steps * batch_size * world * accumulate / seconds:.0f} images/s"
        self._print(line)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step == self._last_step or step % self.every_n_steps:
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        last = total_steps(trainer)
        parts = [f"step {step}/{last} ({100 * step / last:.0f}%)" if last else f"step {step}"]
        parts.append(f"epoch {trainer.current_epoch}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        parts.append(f"{rate:.2f} steps/s")
        if last and rate > 0:
            parts.append(f"ETA {format_duration((last - step) / rate)}")
        self._print("  ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        values = [
            f"{name} {float(trainer.callback_metrics[f'val/{name}']):.4g}"
            for name in _VAL_METRICS
            if f"val/{name}" in trainer.callback_metrics
        ]
        if values:
            self._print(f"epoch {trainer.current_epoch} validation: " + "  ".join(values))


def progress_callbacks(enabled: bool, every_n_steps: int = 100) -> tuple[list[pl.Callback], bool]:
    """(callbacks, enable_progress_bar) for a Trainer: a live rich bar when stdout is a terminal,
    ``LineProgress`` when it is redirected (where a bar draws nothing), neither when ``enabled`` is False."""
    if not enabled:
        return [], False
    if sys.stdout.isatty():
        return [RichProgressBar()], True
    return [LineProgress(every_n_steps=every_n_steps)], False
