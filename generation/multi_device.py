"""`prf generate --devices N`: one worker process per device, each making its own shard of the batch.

Machine shard i/M splits into the N device shards (i + M d)/(M N), d = 0..N-1: together they make exactly
the images of i/M (an index k belongs to shard k mod M N, and k mod M N = i + M d implies k mod M = i).
Each worker sees one GPU (CUDA_VISIBLE_DEVICES = the d-th GPU this process may use) and writes straight
into the shared BATCH folder; images are independent and each write is atomic, so workers never collide,
and a killed run resumes per image like a single process. The parent validates the settings (and that
the folder holds no batch of other settings) before starting anyone, shows one progress bar (by counting
this run's finished records), then consolidates the manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from generation.config import GenerationConfig
from generation.pipeline import shard_indices
from generation.run import (
    check_export_path,
    export_animal3d,
    generation_progress,
    print_summary,
    validated_settings,
)
from prf.data.batch import BatchWriter
from prf.data.io import json_diff


def device_shards(shard: tuple[int, int], devices: int) -> list[tuple[int, int]]:
    """The N device shards (i + M d, M N) whose union is machine shard (i, M)."""
    i, m = shard
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    return [(i + m * d, m * devices) for d in range(devices)]


def finalize_batch(out: Path) -> Any:
    """Consolidate records/ into manifest.parquet for an existing BATCH (no backend needed)."""
    metadata = json.loads((Path(out) / "batch.json").read_text(encoding="utf-8"))
    return BatchWriter(out, metadata).finalize()


def _finished(out: Path, wanted: set[str]) -> int:
    """How many of the record files ``wanted`` (this run's images) are in ``out``'s records/."""
    records = Path(out) / "records"
    return len(wanted.intersection(os.listdir(records))) if records.is_dir() else 0


def visible_devices(devices: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each of ``devices`` workers: the d-th GPU this process may use
    (its own CUDA_VISIBLE_DEVICES list when set, else GPU d)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(d) for d in range(devices)]
    ids = [part.strip() for part in given.split(",") if part.strip()]
    if devices > len(ids):
        raise ValueError(
            f"--devices {devices}, but CUDA_VISIBLE_DEVICES={given!r} makes only {len(ids)} GPU(s) visible"
        )
    return ids[:devices]


def check_same_batch(out: Path, config: GenerationConfig) -> None:
    """Refuse, before any worker starts, a folder whose BATCH was made with other generator settings
    (each worker would refuse it too, but only after loading its backend)."""
    path = out / "batch.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError, AttributeError):
        return  # the workers' BatchWriter names what is wrong with it
    differences = json_diff(recorded, config.model_dump(mode="json"), "in the existing batch", "now")
    if differences:
        raise ValueError(
            f"{out} already holds a batch with other generator settings (use a new folder, or delete this "
            "one to start again): " + "; ".join(differences[:8])
        )


def run_generate_devices(
    out: Path,
    settings: dict[str, Any],
    shard: tuple[int, int],
    devices: int,
    workers: int = 2,
    animal3d_json: Path | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Generate shard `shard` of a batch with one worker process per device; returns counts."""
    config, _ = validated_settings(settings)  # every config error before any process starts
    check_export_path(animal3d_json)
    check_same_batch(Path(out), config)
    shards = device_shards(shard, devices)
    gpus = visible_devices(devices)
    indices = shard_indices(config.n, shard)
    total = len(indices)
    wanted = {f"{k:08d}.json" for k in indices}  # the records of this shard (prf generate's image ids)
    before = _finished(out, wanted)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        settings_path = Path(tmp) / "settings.json"
        settings_path.write_text(json.dumps(config.model_dump(mode="json")))
        procs = []
        for device, (j, n) in enumerate(shards):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[device])
            cmd = [
                sys.executable,
                "-m",
                "generation.run",
                str(out),
                str(settings_path),
                f"{j}/{n}",
                str(workers),
            ]
            log = open(Path(tmp) / f"worker-{device}.log", "w")  # noqa: SIM115 (closed below)
            procs.append((device, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        with generation_progress(quiet) as progress:
            task = progress.add_task(f"{out} on {devices} devices", total=total)
            while any(p.poll() is None for _, p, _ in procs):
                progress.update(task, completed=min(total, _finished(out, wanted)))
                time.sleep(0.5)
            progress.update(task, completed=min(total, _finished(out, wanted)))
        failed = []
        for device, proc, log in procs:
            log.close()
            if proc.returncode != 0:
                tail = (Path(tmp) / f"worker-{device}.log").read_text()[-2000:]
                failed.append(f"device {device} (exit {proc.returncode}):\n{tail}")
        if failed:
            raise RuntimeError("generation workers failed; rerun to resume.\n" + "\n".join(failed))
    manifest = finalize_batch(out)
    if animal3d_json is not None:
        export_animal3d(out, animal3d_json)
    made = _finished(out, wanted) - before
    counts = {"made": made, "skipped": total - made}
    if not quiet:
        print_summary(out, manifest, counts, time.perf_counter() - started)
    return counts
