"""`prf demo`: the main job on the built-in defaults, end to end, in a few minutes on a CPU.

1. generate a small 3D-DST batch with the built-in quadruped and the render backend, with injected
   failures (the image is made from a perturbed state, the annotation keeps the intended one);
2. score it with the default checkpoints (checkpoints/prf_model_a.pt, prf_model_b.pt) and the shipped
   thresholds.yaml;
3. show the filter's summary, and how its verdicts line up with the injected failures (which a real batch
   would not tell you), plus a contact sheet of the batch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from generation.run import run_generate
from generation.sheet import write_contact_sheet
from prf.score import default_thresholds, score

console = Console()


def verdicts_vs_injected(batch: Path, scores_path: Path) -> Table:
    """A table: for each injected failure type, how many images there were and how many PRF rejected."""
    manifest = pd.read_parquet(batch / "manifest.parquet", columns=["image_id", "injected_failure"])
    scores = pd.read_parquet(scores_path, columns=["image_id", "keep", "status"])
    joined = manifest.merge(scores, on="image_id", how="left")
    table = Table(title="PRF verdicts vs the injected failures (known only because this batch is synthetic)")
    table.add_column("injected failure")
    table.add_column("images", justify="right")
    table.add_column("rejected by PRF", justify="right")
    for name, group in joined.groupby("injected_failure", sort=True):
        rejected = int((~group["keep"].astype(bool)).sum())
        table.add_row(str(name), str(len(group)), f"{rejected} ({100.0 * rejected / len(group):.0f}%)")
    return table


def run_demo(out: Path = Path("demo"), n: int = 48, seed: int = 2026, image_size: int = 256) -> None:
    out = Path(out)
    batch = out / "batch"
    console.rule("[bold]1. generate a 3D-DST batch (built-in quadruped, render backend)")
    run_generate(batch, {"n": n, "seed": seed, "image_size": image_size, "inject_failures": 0.5})
    sheet = write_contact_sheet(batch, out / "batch_sheet.png", limit=12)
    thresholds = default_thresholds()
    console.rule("[bold]2. score it with PRF (default checkpoints)")
    console.print(f"thresholds: {thresholds}", markup=False)
    scores_path = out / "scores.parquet"
    summary = score(batch, thresholds, out=scores_path, workers=0)
    console.print(summary.renderable())
    console.rule("[bold]3. result")
    console.print(verdicts_vs_injected(batch, scores_path))
    console.print(f"SCORES table: {scores_path}", markup=False)
    console.print(f"kept / rejected image lists: {summary.keep_list}, {summary.reject_list}", markup=False)
    console.print(f"contact sheet of the batch: {sheet}", markup=False)
    console.print(f"HTML report: prf report {scores_path}", markup=False)
