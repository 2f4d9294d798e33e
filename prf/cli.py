"""The `prf` command. Each subcommand imports its heavy modules lazily so `prf --help` stays fast.

Config-level problems (a bad flag value, a missing file, an invalid YAML) are reported as one clear error
line before any work starts, never as a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="prf",
    help="PRF: filter diffusion-generated 3D-annotated animal images; generate 3D-DST batches; run KCF.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
batch_app = typer.Typer(help="Inspect BATCH folders.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input or configuration: shown as one line, exit code 2."""


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints prf's own warnings (about the user's setup, e.g. thresholds
    calibrated for another checkpoint) as one ``warning:`` line, and passes the rest on to ``show``."""
    from prf.thresholds import CalibrationMismatchWarning

    def showwarning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if issubclass(category, CalibrationMismatchWarning):
            console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, markup=True)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def friendly_errors(func: F) -> F:
    """Turn configuration errors into a one-line message and exit code 2 (no traceback), and show prf's
    own warnings as one line each."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            with warnings.catch_warnings():  # restores showwarning afterwards
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return func(*args, **kwargs)
        except (UserError, FileNotFoundError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
            raise typer.Exit(code=2) from None
        except SystemExit as exc:
            if not _is_lightning_sigterm(exc):
                raise
            # Lightning stops training / prediction on SIGTERM with a SystemExit without a code, which
            # would exit 0: a scheduler's preemption must not look like success to the next step
            console.print(
                "[bold red]stopped:[/] SIGTERM; the work so far is kept: rerun the same command to resume",
                highlight=False,
                markup=True,
            )
            raise typer.Exit(code=SIGTERM_EXIT_CODE) from None

    return wrapper  # type: ignore[return-value]


SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


def _is_lightning_sigterm(exc: SystemExit) -> bool:
    """Whether ``exc`` is Lightning's SIGTERMException (looked up only when Lightning is loaded)."""
    module = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return module is not None and isinstance(exc, module.SIGTERMException)


def show_info_logs() -> None:
    """Print the project's INFO log lines (``prf.*`` loggers: the data split, frozen parameters, backbone
    weights) to stderr as plain lines, in the first process only: DDP's other ranks run the same command
    and would repeat every line. Python shows only warnings by default."""
    from prf.score_distributed import launched_rank

    if launched_rank(devices=1) != 0:  # 0 exactly for the first process, whatever the devices per node
        return
    project = logging.getLogger("prf")
    if not any(isinstance(h, _StderrHandler) for h in project.handlers):  # once, however often this runs
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        project.addHandler(handler)
    project.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (a plain StreamHandler keeps the stream it was
    made with, which a test runner's capture may since have closed)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ sets it; the property ignores it
        pass


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UserError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < N")
    return i, n


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's batch and scores.")] = Path(
        "demo"
    ),
    n: Annotated[int, typer.Option("--n", help="Images to generate.")] = 48,
    seed: Annotated[int, typer.Option(help="Generation seed.")] = 2026,
) -> None:
    """The main job on the built-in defaults: generate a small batch with failures, score it, show it."""
    from prf.demo import run_demo

    run_demo(out, n=n, seed=seed)


@app.command()
@friendly_errors
def body(
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("body.png"),
    smal: Annotated[
        Path | None, typer.Option(help="A SMAL model pickle; default: the built-in quadruped.")
    ] = None,
    family_data: Annotated[Path | None, typer.Option(help="SMAL shape-family data (cluster_means).")] = None,
    family: Annotated[int | None, typer.Option(help="Start from this shape family's mean betas.")] = None,
    size: Annotated[int, typer.Option(help="Size of each view in pixels.")] = 384,
    seed: Annotated[int, typer.Option(help="Seed of the sampled poses shown next to the rest pose.")] = 0,
) -> None:
    """Render a body model (rest pose and sampled poses) with its keypoints and part colours."""
    from prf.body_preview import render_body_sheet

    path = render_body_sheet(out, smal=smal, family_data=family_data, family=family, size=size, seed=seed)
    console.print(f"wrote {path}", markup=False)


@app.command()
@friendly_errors
def generate(
    out: Annotated[Path, typer.Argument(help="BATCH folder to write (resumes if it exists).")],
    n: Annotated[
        int | None, typer.Option("--n", help="Number of images in the whole batch. Default: 64.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Run seed; each image's seed derives from it. Default: 0.")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="render (built-in, no weights; the default) or diffusers.")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels. Default: 256.")] = None,
    inject_failures: Annotated[
        float | None, typer.Option(help="Fraction of images with an injected failure. Default: 0.")
    ] = None,
    failure_types: Annotated[
        list[str] | None, typer.Option(help="Failure types to inject (repeatable).")
    ] = None,
    smal: Annotated[
        Path | None, typer.Option(help="A SMAL model pickle; default: built-in quadruped.")
    ] = None,
    family_data: Annotated[Path | None, typer.Option(help="SMAL shape-family data file.")] = None,
    poses: Annotated[Path | None, typer.Option(help="Poses: Animal3D JSON, Parquet or NPZ.")] = None,
    categories: Annotated[list[str] | None, typer.Option(help="Categories to draw (repeatable).")] = None,
    style: Annotated[
        str | None, typer.Option(help="synthetic (the default), or standin (a stand-in 'real' look).")
    ] = None,
    animal3d_json: Annotated[
        Path | None, typer.Option(help="Also write the batch as an Animal3D-format JSON here.")
    ] = None,
    focal_px: Annotated[
        float | None, typer.Option(help="Focal length in pixels (default: 3D-DST's lens).")
    ] = None,
    image_format: Annotated[
        str | None,
        typer.Option(help="png (lossless, the default) or jpg (quality 95, ~5x smaller, faster to score)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML of generation settings (docs/generation.md); the options given here win."),
    ] = None,
    shard: Annotated[str, typer.Option(help="Make only shard i of N (i/N).")] = "0/1",
    devices: Annotated[
        int, typer.Option(help="Worker processes, one per device (GPU), each a sub-shard.")
    ] = 1,
    workers: Annotated[int, typer.Option(help="Preparation threads.")] = 2,
    model_path: Annotated[
        Path | None, typer.Option(help="diffusers backend: local SD 1.5 folder or cache id.")
    ] = None,
    controlnet_path: Annotated[Path | None, typer.Option(help="diffusers backend: local ControlNet.")] = None,
) -> None:
    """Generate a 3D-DST batch of annotated animal images (a BATCH folder)."""
    from generation.run import run_generate

    if devices < 1:
        raise UserError(f"--devices must be >= 1, got {devices}")
    settings: dict[str, object] = {"n": 64}  # the one setting without a default in GenerationConfig
    if config is not None:
        import yaml

        if not config.exists():
            raise UserError(f"config file not found: {config}")
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{config}: a generation config must be a YAML mapping of settings")
        settings.update(loaded)
    # an option given on the command line wins over the file; one left out keeps the file's value
    optional = {
        "n": n,
        "seed": seed,
        "backend": backend,
        "image_size": image_size,
        "inject_failures": inject_failures,
        "style": style,
        "failure_types": failure_types or None,
        "categories": categories or None,
        "smal": str(smal) if smal else None,
        "family_data": str(family_data) if family_data else None,
        "poses": str(poses) if poses else None,
        "focal_px": focal_px,
        "image_format": image_format,
    }
    settings.update({k: v for k, v in optional.items() if v is not None})
    backend_options = dict(settings.get("backend_options") or {})  # type: ignore[arg-type]
    if model_path is not None:
        backend_options["base_model"] = str(model_path)
    if controlnet_path is not None:
        backend_options["controlnet_model"] = str(controlnet_path)
    settings["backend_options"] = backend_options
    if devices > 1:
        from generation.multi_device import run_generate_devices

        run_generate_devices(out, settings, parse_shard(shard), devices, workers, animal3d_json=animal3d_json)
    else:
        run_generate(out, settings, shard=parse_shard(shard), workers=workers, animal3d_json=animal3d_json)


@app.command()
@friendly_errors
def train(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data", help="BATCH folder(s) (synthetic, pretrain) or an Animal3D-format JSON (finetune)."
        ),
    ],
    stage: Annotated[str, typer.Option(help="synthetic | pretrain | finetune")] = "synthetic",
    config: Annotated[
        Path | None, typer.Option(help="Training YAML (default prf/configs/train_default_<stage>.yaml).")
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Export to start from (finetune: the pretrain export).")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="pare | hmr")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder; run again with it to resume.")] = None,
    val: Annotated[list[Path] | None, typer.Option(help="Held-out data (default: a seeded split).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Trainer max_epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Trainer max_steps.")] = None,
    devices: Annotated[str | None, typer.Option(help="Trainer devices (e.g. 1, 4, auto).")] = None,
    accelerator: Annotated[str | None, typer.Option(help="cpu, gpu, auto.")] = None,
    strategy: Annotated[str | None, typer.Option(help="auto, ddp, ...")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Nodes for multi-node DDP.")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true, 16-mixed, bf16-mixed.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.sub=value (repeatable).")
    ] = None,
    smal: Annotated[
        Path | None, typer.Option(help="SMAL model file (config key smal; default: the built-in quadruped).")
    ] = None,
    family_data: Annotated[
        Path | None, typer.Option(help="SMAL shape-family data file (config key family_data).")
    ] = None,
) -> None:
    """Train a PRF regressor stage (model A: synthetic; model B: pretrain, then finetune)."""
    from prf.train import parse_overrides, run_train

    show_info_logs()

    flags = {
        "trainer.max_epochs": max_epochs,
        "trainer.max_steps": max_steps,
        "trainer.devices": devices,
        "trainer.accelerator": accelerator,
        "trainer.strategy": strategy,
        "trainer.num_nodes": num_nodes,
        "trainer.precision": precision,
    }
    items = [*(set_ or []), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    overrides = parse_overrides(items)
    # paths go in as they are (not parsed as YAML)
    overrides.update({k: str(v) for k, v in (("smal", smal), ("family_data", family_data)) if v is not None})
    export = run_train(stage, data, config, init, arch, run_dir, overrides, val_data=val)
    console.print(f"wrote {export}", markup=False)


@app.command()
@friendly_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="An export.pt from prf train.")],
    data: Annotated[Path, typer.Argument(help="BATCH folder or Animal3D-format JSON.")],
    rows: Annotated[str, typer.Option(help="BATCH rows: faithful | failures | all.")] = "faithful",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only.")] = None,
    smal: Annotated[Path | None, typer.Option(help="SMAL model the checkpoint was trained with.")] = None,
    family_data: Annotated[Path | None, typer.Option(help="SMAL shape-family data file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    flip_test: Annotated[
        bool,
        typer.Option(
            help="Average detected keypoints over each crop and its mirror (as prf score does); "
            "--no-flip-test gives the training validation's numbers."
        ),
    ] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader worker processes preparing the crops.")] = 0,
) -> None:
    """PA-MPJPE, S-MPJPE ("mm"), PCK@0.1 / 0.15 and the image count of a checkpoint on labelled data."""
    import json

    from prf.body import SMAL
    from prf.evaluate import evaluate as run_evaluate
    from prf.evaluate import format_result
    from prf.score import usable_device

    torch_device = usable_device(device)
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if rows not in ("faithful", "failures", "all"):
        raise UserError(f"--rows must be faithful, failures or all, got {rows!r}")
    if family_data is not None and smal is None:
        raise UserError("--family-data is the shape-family file of a SMAL model: give --smal too")
    body = SMAL.from_file(smal, family_data=family_data) if smal else None
    result = run_evaluate(
        checkpoint, data, batch_size, limit, rows, body, workers, str(torch_device), flip_test=flip_test
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(format_result(result))


@batch_app.command("sheet")
@friendly_errors
def batch_sheet(
    batch: Annotated[Path, typer.Argument(help="BATCH folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write.")] = None,
    limit: Annotated[int, typer.Option(help="Images to show.")] = 16,
) -> None:
    """Write a contact sheet (image, condition, part overlay, keypoints) of a BATCH."""
    from generation.sheet import write_contact_sheet

    path = write_contact_sheet(batch, out or batch / "sheet.png", limit=limit)
    console.print(f"wrote {path}", markup=False)


@batch_app.command("finalize")
@friendly_errors
def batch_finalize(batch: Annotated[Path, typer.Argument(help="BATCH folder.")]) -> None:
    """Consolidate a BATCH's finished records into manifest.parquet (after sharded runs)."""
    from generation.multi_device import finalize_batch

    manifest = finalize_batch(batch)
    console.print(f"{batch}: manifest.parquet lists {len(manifest)} images", markup=False)


def _register_commands() -> None:
    """Commands whose functions live in their own modules (each imports its heavy parts lazily)."""
    from kcf import cli as kcf_cli
    from prf import cli_score

    app.command("score")(cli_score.score)
    app.command("calibrate")(cli_score.calibrate)
    app.command("report")(cli_score.report)
    app.command("kcf")(friendly_errors(kcf_cli.kcf))


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
