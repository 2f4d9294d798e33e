"""`prf generate`: validate the settings, build the parts, run the pipeline with a progress bar, summarise.

All validation (config keys, paths, backend weights) happens before the first image is made.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from generation.backends import build_backend
from generation.backends.base import backend_class
from generation.config import CategoryTable, GenerationConfig, load_category_table
from generation.pipeline import GenerationPipeline
from generation.pose_sources import build_pose_source
from prf.body import SMAL
from prf.config_errors import validation_message
from prf.data.animal3d import write_animal3d_json
from prf.data.batch import BatchReader, BatchWriter
from prf.data.io import check_output_file

console = Console(stderr=True)


def load_body_model(smal: str | None, family_data: str | None = None) -> SMAL:
    """The SMAL file the user gave, or the built-in quadruped."""
    if smal is None:
        return SMAL.builtin()
    return SMAL.from_file(smal, family_data=family_data)


def backend_options(config: GenerationConfig) -> dict[str, Any]:
    """Constructor options of the chosen backend; the render backend also gets the appearance style."""
    options = dict(config.backend_options)
    if config.backend == "render":
        options.setdefault("style", config.style)
        if config.background_dir is not None:
            options.setdefault("background_dir", config.background_dir)
    return options


# CLI options that set a backend option, for the error message
_OPTION_FLAGS = {"base_model": "--model-path", "controlnet_model": "--controlnet-path"}


def check_backend_options(config: GenerationConfig) -> None:
    """Refuse backend options the chosen backend's constructor does not take (before anything loads)."""
    accepted = inspect.signature(backend_class(config.backend).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return  # a backend taking **options checks them itself
    takes = [name for name in accepted if name != "self"]
    unknown = [key for key in backend_options(config) if key not in takes]
    if unknown:
        named = ", ".join(f"{_OPTION_FLAGS[k]} (backend_options.{k})" if k in _OPTION_FLAGS else
                          f"backend_options.{k}" for k in unknown)  # fmt: skip
        raise ValueError(f"the {config.backend} backend takes no {named}; it takes {', '.join(takes)}")


def check_export_path(animal3d_json: Path | None) -> None:
    """Refuse an ``--animal3d-json`` path that cannot be written, before any image is made (the export
    runs last)."""
    if animal3d_json is not None:
        check_output_file(animal3d_json, "--animal3d-json", "train.json")


def generation_progress(quiet: bool) -> Progress:
    """The rich progress bar of `prf generate` (task description = what is being made)."""
    columns = (TextColumn("[bold]generate[/] {task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeRemainingColumn(), console=console, disable=quiet)


def validated_settings(settings: dict[str, Any]) -> tuple[GenerationConfig, CategoryTable]:
    """Raw settings -> (GenerationConfig, its category table); every config error (keys, values, unknown
    category names) raises here, before any work."""
    try:
        config = GenerationConfig.model_validate(settings)
    except ValidationError as err:
        raise ValueError(validation_message(err, "generation settings")) from None
    check_backend_options(config)
    categories = load_category_table(config.category_table)
    for name in config.categories:
        categories.by_name(name)
    return config, categories


def build_pipeline(config: GenerationConfig, categories: CategoryTable) -> GenerationPipeline:
    """The pipeline a validated config describes: its body model, pose source and backend (the caller
    closes ``pipeline.backend`` when done)."""
    model = load_body_model(config.smal, config.family_data)
    pose_source = build_pose_source(config.poses, list(model.joint_names), config.pose_config)
    backend = build_backend(config.backend, **backend_options(config))
    return GenerationPipeline(config, model, backend, categories, pose_source)


def render_pipeline_of_batch(batch: Path) -> GenerationPipeline:
    """A pipeline that re-renders a BATCH's images as they were planned: its recorded generator settings
    (batch.json) with the render backend, whatever backend made the pictures (only the renders are
    needed, e.g. ``pipeline.render_states(pipeline.plan(index))``). The same plans and renders need the
    same body model, pose source and generation code as the run that made the batch."""
    generator = BatchReader(batch).metadata.get("generator")  # NotABatchError when it is no BATCH
    if not isinstance(generator, dict):
        raise ValueError(f"{Path(batch) / 'batch.json'}: no 'generator' settings to re-render from")
    # the backend (and its backgrounds) make only the picture, which is not re-made here
    settings = {**generator, "backend": "render", "backend_options": {}, "background_dir": None}
    config, categories = validated_settings(settings)
    return build_pipeline(config, categories)


def run_generate(
    out: Path,
    settings: dict[str, Any],
    shard: tuple[int, int] = (0, 1),
    workers: int = 2,
    animal3d_json: Path | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Generate (or resume) a BATCH at `out` from raw settings (validated into a GenerationConfig)."""
    config, categories = validated_settings(settings)
    check_export_path(animal3d_json)
    torch.set_num_threads(1)  # the pipeline parallelises over images with threads
    pipeline = build_pipeline(config, categories)
    backend = pipeline.backend
    metadata = {
        "generator": config.model_dump(mode="json"),
        "backend": backend.describe(),
        "pose_source": pipeline.pose_source.describe(),
        "smal_layout": pipeline.model.layout_signature(),
        "categories": [
            {"id": c.category_id, "name": c.name, "supercategory": c.supercategory}
            for c in pipeline.categories
        ],
    }
    writer = BatchWriter(out, metadata, image_format=config.image_format)
    total = len(pipeline.indices(shard))
    failures: Counter[str] = Counter()
    started = time.perf_counter()
    with generation_progress(quiet) as progress:
        task = progress.add_task(f"{out} shard {shard[0]}/{shard[1]}", total=total)
        done_before = sum(writer.is_done(f"{k:08d}") for k in pipeline.indices(shard))
        progress.update(task, completed=done_before)

        def on_image(record: dict[str, object]) -> None:
            failures[str(record["injected_failure"])] += 1
            progress.advance(task)

        counts = pipeline.run(writer, shard=shard, workers=workers, on_image=on_image)
    elapsed = time.perf_counter() - started
    backend.close()
    manifest = writer.finalize()
    if animal3d_json is not None:
        export_animal3d(out, animal3d_json)
    if not quiet:
        print_summary(out, manifest, counts, elapsed)
    return counts


def export_animal3d(batch: Path, json_path: Path) -> Path:
    """Write a BATCH's annotations as an Animal3D-format JSON ({"data": [...]}), image paths relative to
    the JSON's folder. Used to make the stand-in "real" fine-tuning set (never call it Animal3D)."""
    reader = BatchReader(batch)
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(batch.resolve(), json_path.parent.resolve()))
    annotations = []
    for image_id in reader.image_ids():
        ann = reader.read_annotation(image_id)
        update = {"img_path": (rel / ann.img_path).as_posix()}
        if ann.mask_path:
            update["mask_path"] = (rel / ann.mask_path).as_posix()
        annotations.append(ann.model_copy(update=update))
    note = "stand-in set rendered by prf generate; NOT Animal3D"
    return write_animal3d_json(json_path, annotations, extra={"info": {"description": note}})


def print_summary(out: Path, manifest: Any, counts: dict[str, int], elapsed: float) -> None:
    table = Table(title=f"BATCH {out}", show_lines=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("images in batch", str(len(manifest)))
    table.add_row("made now", str(counts["made"]))
    table.add_row("already there (resumed)", str(counts["skipped"]))
    if len(manifest):
        for name, value in manifest["injected_failure"].value_counts().sort_index().items():
            table.add_row(f"  injected_failure = {name}", str(value))
        for name, value in manifest["category"].value_counts().sort_index().items():
            table.add_row(f"  category = {name}", str(value))
    if counts["made"]:
        table.add_row("images / s (this run)", f"{counts['made'] / max(elapsed, 1e-9):.1f}")
    console.print(table)


def _worker_main(argv: list[str]) -> None:
    """Entry of one `prf generate --devices N` worker: OUT SETTINGS_JSON SHARD(i/N) WORKERS."""
    out, settings_path, shard_text, workers = argv
    i, n = (int(v) for v in shard_text.split("/"))
    settings = json.loads(Path(settings_path).read_text())
    run_generate(Path(out), settings, shard=(i, n), workers=int(workers), quiet=True)


if __name__ == "__main__":
    import sys

    _worker_main(sys.argv[1:])
