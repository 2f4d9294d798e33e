"""``prf kcf``: the K-fold consistency filter as a command (registered by ``prf.cli``).

Heavy modules (torch, Lightning, timm) are imported inside the function, so importing this module is cheap.
Configuration problems (a missing input, a bad config or thresholds file, an unknown fold) raise
FileNotFoundError / ValueError before any image is read or any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from kcf.run import KCFResult

DEFAULT_OUT = Path("kcf_scores") / "scores.parquet"


def kcf(
    input: Annotated[
        Path,
        typer.Argument(
            help="BATCH folder, Animal3D-format JSON, annotated image folder or 3D-DST output folder."
        ),
    ],
    folds: Annotated[
        int | None, typer.Option("--folds", help="Number of folds K (default: the config's, 5).")
    ] = None,
    thresholds: Annotated[
        Path | None,
        typer.Option("--thresholds", help="KCF thresholds YAML: ce_max (nats), geodesic_max (radians)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="SCORES Parquet to write (default kcf_scores/scores.parquet)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="KCF config YAML (default: the packaged CPU config).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs per fold (trainer.max_epochs).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the fold shuffle and of training.")
    ] = None,
    fold: Annotated[
        list[int] | None,
        typer.Option(
            "--fold",
            help="Run only this fold (repeatable), e.g. one fold per machine; rerun without it to collect.",
        ),
    ] = None,
    dst_images: Annotated[
        str | None, typer.Option("--dst-images", help="3D-DST input: the generated-image folder name.")
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option("--work-dir", help="Per-fold folder (default: <out stem>.kcf beside --out)."),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard finished folds and start again.")
    ] = False,
    set_values: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override key=value, e.g. --set model.input_size=128."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run KCF: train a binned pose classifier on K-1 folds, score the held-out fold, threshold the loss."""
    from rich.console import Console

    from kcf.run import load_config, load_thresholds, run_kcf
    from prf.train import parse_overrides

    console = Console(stderr=True)
    # (Lightning's per-Trainer notices are silenced around each fold: prf.lightning_quiet)
    if not input.exists():
        raise FileNotFoundError(f"input {input} does not exist")
    overrides = parse_overrides(set_values or [])
    optional = {"folds": folds, "trainer.max_epochs": epochs, "seed": seed, "data.dst_images": dst_images}
    overrides.update({k: v for k, v in optional.items() if v is not None})
    if quiet:
        overrides["trainer.progress_bar"] = False
    cfg = load_config(config, overrides)
    load_thresholds(thresholds)  # a bad file fails here, before any work
    bad = [k for k in fold or [] if not 0 <= k < cfg.folds]
    if bad:
        raise ValueError(f"--fold {bad}: folds are numbered 0..{cfg.folds - 1}")
    out = out or DEFAULT_OUT

    def done(k: int) -> None:
        if not quiet:
            console.print(f"[bold]kcf[/] fold {k + 1}/{cfg.folds} done")

    result = run_kcf(
        input,
        out,
        cfg,
        thresholds,
        work_dir=work_dir,
        restart=restart,
        only_folds=fold,
        on_fold_done=done,
    )
    if result is None:
        console.print(f"folds {sorted(set(fold or []))} done; rerun without --fold once every fold is done")
        return
    print_summary(result, console)


def summary_rows(result: KCFResult) -> list[tuple[str, str]]:
    """(label, value) rows of a KCF run's summary: verdict counts, reject reasons, cost."""
    s = result.scores
    n = len(s)
    ok = (s["status"] == "ok").to_numpy()
    keep = s["keep"].to_numpy(dtype=bool)
    reasons = s.loc[ok & ~keep, "reason"]

    def share(k: int) -> str:
        return f"{k} ({100.0 * k / n:.1f}%)" if n else "0"

    scored = s.loc[ok, "kcf_ce"]
    total = result.train_seconds + result.score_seconds
    cost = result.metadata.get("cost", {})
    return [
        ("images", str(n)),
        ("kept", share(int(keep.sum()))),
        ("rejected", share(int((ok & ~keep).sum()))),
        ("  failing ce_max", str(int(reasons.str.contains("ce ", regex=False).sum()))),
        ("  failing geodesic_max", str(int(reasons.str.contains("geodesic ", regex=False).sum()))),
        ("errors", share(int((~ok).sum()))),
        ("median kcf_ce (nats)", f"{scored.median():.3f}" if len(scored) else "-"),
        ("folds finished by an earlier run", ", ".join(map(str, result.resumed_folds)) or "none"),
        ("folds continued mid-training", ", ".join(map(str, result.continued_folds)) or "none"),
        ("training time, all folds", f"{result.train_seconds:.1f} s"),
        ("scoring time, all folds", f"{result.score_seconds:.1f} s"),
        ("cost per image", f"{1000.0 * total / max(n, 1):.1f} ms"),
        ("device", str(cost.get("device", "?"))),
    ]


def print_summary(result: KCFResult, console: Console | None = None) -> None:
    """Print a KCF run's summary as a rich table, with the first error rows."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=True)
    table = Table(title=f"prf kcf: {result.out}", show_header=False)
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)
    errors = result.scores[result.scores["status"] != "ok"].head(5)
    if len(errors):
        listing = Table(title=f"errors (first {len(errors)})")
        listing.add_column("image_id")
        listing.add_column("reason", overflow="fold")
        for image_id, reason in zip(errors["image_id"], errors["reason"], strict=True):
            listing.add_row(Text(str(image_id)), Text(str(reason)))  # a path may look like a Rich tag
        console.print(listing)
    console.print(f"keep list: {result.keep_file}   reject list: {result.reject_file}", markup=False)
