"""PNG encode and decode cost per image: Pillow's encoder (what BATCHes used to be written with) against
``prf.data.png.encode_png`` (Sub-filtered rows, libdeflate), on a BATCH's own pixels.

    python benchmarks/png_codec.py runs/bench/score5000m [--images 500] [--repeats 3] [--out JSON]
    python benchmarks/png_codec.py --quick             # generates 16 images at 64 px; no file unless --out

For each of the first N images and masks of the BATCH (decoded once, whatever their format), in memory,
one process, one thread:

- Pillow (``compress_level=6``, adaptive row filters): encode ms, bytes, and decode ms with libspng (the
  reader's path for such files) and with Pillow;
- encode_png (level 6): encode ms, bytes, and decode ms with ``decode_png`` (the reader's path for them).

Each time is the median over ``--repeats`` passes of the whole set, divided by the images. Every decode is
checked against the pixels it started from.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.filter_quality import generate_batch  # noqa: E402
from prf.data.batch import BatchReader  # noqa: E402
from prf.data.io import PNG_GREY, PNG_RGB  # noqa: E402
from prf.data.png import decode_png, encode_png  # noqa: E402

QUICK_SEED = 40_002  # disjoint from every training and benchmark seed (benchmarks/README.md)


def pillow_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def spng_decode(data: bytes) -> np.ndarray:
    from imagecodecs import spng_decode as decode

    return decode(data)


def per_image_ms(function: Callable[[Any], Any], inputs: list[Any], repeats: int) -> float:
    """Median over ``repeats`` passes of ``function`` over every input, in ms per input."""
    function(inputs[0])  # warm up (imports, first allocations)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in inputs:
            function(item)
        passes.append((time.perf_counter() - start) / len(inputs) * 1e3)
    return float(np.median(passes))


def measure(pixels: list[np.ndarray], colour_type: int, repeats: int) -> dict[str, Any]:
    """Both encoders and their decoders on one kind of picture (all images, or all masks)."""
    pillow_files = [pillow_png(p) for p in pixels]
    our_files = [encode_png(p) for p in pixels]
    for original, theirs, ours in zip(pixels, pillow_files, our_files, strict=True):
        mine = decode_png(ours, colour_type, 8192)
        if mine is None or not np.array_equal(mine, original):
            raise AssertionError("decode_png did not give back the pixels encode_png was given")
        if not np.array_equal(spng_decode(theirs), original):
            raise AssertionError("libspng did not give back the pixels Pillow encoded")
    pillow = {
        "encode_ms": per_image_ms(pillow_png, pixels, repeats),
        "bytes_per_image": float(np.mean([len(f) for f in pillow_files])),
        "decode_spng_ms": per_image_ms(spng_decode, pillow_files, repeats),
        "decode_pillow_ms": per_image_ms(pillow_decode, pillow_files, repeats),
    }
    ours = {
        "encode_ms": per_image_ms(encode_png, pixels, repeats),
        "bytes_per_image": float(np.mean([len(f) for f in our_files])),
        "decode_ms": per_image_ms(lambda data: decode_png(data, colour_type, 8192), our_files, repeats),
    }
    return {
        "images": len(pixels),
        "shape": list(pixels[0].shape),
        "pillow": pillow,
        "encode_png": ours,
        "encode_speedup": pillow["encode_ms"] / ours["encode_ms"],
        "decode_speedup_vs_spng": pillow["decode_spng_ms"] / ours["decode_ms"],
        "size_ratio": ours["bytes_per_image"] / pillow["bytes_per_image"],
    }


def load(batch: Path, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    reader = BatchReader(batch)
    ids = list(reader.manifest["image_id"][:count])
    return [reader.read_image(i) for i in ids], [reader.read_mask(i) for i in ids]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=Path, nargs="?", default=None, help="BATCH folder (not with --quick)")
    parser.add_argument("--images", type=int, default=500, help="images (and masks) of the BATCH to use")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the set; the median is kept")
    parser.add_argument(
        "--quick", action="store_true", help="16 generated 64 px images; no file unless --out"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = parser.parse_args(argv)
    if (args.batch is None) != args.quick:
        parser.error("give a BATCH folder, or --quick (which generates its own)")
    with tempfile.TemporaryDirectory(prefix="png-codec-") as scratch:
        batch = args.batch
        if args.quick:
            batch = Path(scratch) / "batch"
            generate_batch(batch, seed=QUICK_SEED, n=16, image_size=64, inject=0.0)
        images, masks = load(batch, 16 if args.quick else args.images)
    repeats = 1 if args.quick else args.repeats
    result = {
        "machine": common.machine(),
        "quick": args.quick,
        "batch": str(args.batch) if args.batch else None,
        "images": measure(images, PNG_RGB, repeats),
        "masks": measure(masks, PNG_GREY, repeats),
    }
    print(json.dumps(result, indent=1))
    common.write_result(result, args.out, args.quick, ROOT / "benchmarks" / "results" / "png_codec.json")


if __name__ == "__main__":
    main()
