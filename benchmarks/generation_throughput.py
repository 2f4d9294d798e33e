"""Generation throughput: the render backend's images/s, and the diffusers backend's per-image overhead.

    python benchmarks/generation_throughput.py [--n 200] [--size 256] [--quick] [--out JSON]

1. render backend: end-to-end `prf generate` images/s at --size px (target >= 20 images/s on 2 cores).
2. diffusion backends at 512 px: the work per image outside the diffusion call (posing, ray casting,
   Canny, writing) in ms, measured two ways:
   - serial: preparation + writing time per image when nothing overlaps (the CPU cost; target <= 50 ms);
   - exposed: (wall time - time inside the diffusion call) / n in the real pipeline loop, with a simulated
     0.5 s GPU call per batch of 4 (see SimulatedDiffusion), i.e. the part of that cost the pipeline fails
     to hide behind the model.
3. the real diffusers backend end to end with the tiny random pipeline (tests/tiny_diffusers.py), 64 px.
Results are written to benchmarks/results/generation_throughput.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny diffusers pipeline lives with the tests
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from common import machine, write_result  # noqa: E402

from generation.backends import GenerationBackend, GenerationRequest  # noqa: E402
from generation.config import GenerationConfig, load_category_table  # noqa: E402
from generation.pipeline import GenerationPipeline  # noqa: E402
from generation.pose_sources import build_pose_source  # noqa: E402
from generation.run import run_generate  # noqa: E402
from prf.body import SMAL  # noqa: E402
from prf.data.batch import BatchWriter  # noqa: E402


def bench_render(n: int, size: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"n": n, "seed": 0, "image_size": size, "inject_failures": 0.2}
        started = time.perf_counter()
        run_generate(Path(tmp) / "b", settings, workers=workers, quiet=True)
        elapsed = time.perf_counter() - started
    return {"images": n, "size": size, "workers": workers, "seconds": elapsed, "images_per_s": n / elapsed}


class SimulatedDiffusion(GenerationBackend):
    """Stands in for a GPU diffusion call: returns the condition after sleeping `seconds` per batch.

    Sleeping releases the GIL like a CUDA call does, so this measures how much of the CPU work the
    pipeline hides behind the model. (The tiny random pipeline cannot be used at 512 px here: its VAE
    downsamples by 2, so its UNet attends over 256 x 256 latents and one image takes about a minute.)
    """

    name = "simulated"

    def __init__(self, seconds: float, batch: int) -> None:
        self.seconds, self.batch, self.inside = seconds, batch, 0.0

    @property
    def preferred_batch_size(self) -> int:
        return self.batch

    def generate(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        started = time.perf_counter()
        time.sleep(self.seconds)
        self.inside += time.perf_counter() - started
        return [r.condition.copy() for r in requests]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "seconds": self.seconds}


def bench_diffusion_overhead(n: int, size: int, call_seconds: float, batch: int) -> dict[str, float]:
    model = SMAL.builtin()
    config = GenerationConfig(n=n, seed=0, image_size=size, backend="diffusers")
    backend = SimulatedDiffusion(call_seconds, batch)
    pose_source = build_pose_source(None, list(model.joint_names), None)
    pipeline = GenerationPipeline(config, model, backend, load_category_table(), pose_source)
    with tempfile.TemporaryDirectory() as tmp:
        # serial CPU cost per image: posing, ray casting, Canny, writing (nothing overlapping)
        writer = BatchWriter(Path(tmp) / "serial", {"bench": "serial"})
        prepare_s = write_s = 0.0
        for k in range(n):
            t0 = time.perf_counter()
            item = pipeline.prepare(pipeline.plan(k))
            image = np.zeros((size, size, 3), dtype=np.uint8)
            t1 = time.perf_counter()
            record = {**item.record, "backend": "simulated"}
            writer.write_image(
                item.plan.image_id, image, item.mask, item.request.condition, item.annotation, record
            )
            write_s += time.perf_counter() - t1
            prepare_s += t1 - t0
        # the real pipeline loop: what is left exposed outside the diffusion call
        writer = BatchWriter(Path(tmp) / "pipelined", {"bench": "pipelined"})
        started = time.perf_counter()
        pipeline.run(writer, workers=2)
        wall = time.perf_counter() - started
    return {
        "images": n,
        "size": size,
        "serial_prepare_ms_per_image": 1000 * prepare_s / n,
        "serial_write_ms_per_image": 1000 * write_s / n,
        "serial_overhead_ms_per_image": 1000 * (prepare_s + write_s) / n,
        "simulated_call_s_per_batch": call_seconds,
        "batch_size": batch,
        "pipelined_wall_s": wall,
        "pipelined_inside_diffusion_s": backend.inside,
        "pipelined_exposed_overhead_ms_per_image": 1000 * (wall - backend.inside) / n,
    }


def bench_tiny_pipeline(n: int, size: int) -> dict[str, float]:
    """The real diffusers backend end to end with the tiny random pipeline (a smoke figure, small size)."""
    from tiny_diffusers import build_tiny_diffusers

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_diffusers(Path(tmp) / "weights")
        options = {
            "base_model": str(tiny.base),
            "controlnet_model": str(tiny.controlnet),
            "num_inference_steps": 2,
        }
        settings = {"n": n, "seed": 0, "image_size": size, "backend": "diffusers", "backend_options": options}
        started = time.perf_counter()
        run_generate(Path(tmp) / "b", settings, quiet=True)
        elapsed = time.perf_counter() - started
    return {"images": n, "size": size, "seconds": elapsed, "images_per_s": n / elapsed}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (few images); writes only to an explicit --out"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON to write (default: benchmarks/results/generation_throughput.json)"
    )
    args = parser.parse_args(argv)
    n = 16 if args.quick else args.n
    result = {
        "machine": machine(),
        "quick": args.quick,
        "render_backend": bench_render(n, args.size, args.workers),
        "diffusion_overhead_512px": bench_diffusion_overhead(max(8, n // 4), 512, call_seconds=0.5, batch=4),
        "tiny_diffusers_64px": bench_tiny_pipeline(4, 64),
    }
    print(json.dumps(result, indent=2))
    write_result(result, args.out, args.quick, ROOT / "benchmarks" / "results" / "generation_throughput.json")


if __name__ == "__main__":
    main()
