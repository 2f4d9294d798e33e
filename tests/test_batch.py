"""BATCH writer/reader round trip, resume and crash safety, input detection, and defensive image I/O."""

from __future__ import annotations

import io
import json
import multiprocessing
import struct
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

import prf.data.io as prf_io
from prf.data import inputs
from prf.data.annotation import Annotation, AnnotationError
from prf.data.batch import (
    COLUMNS,
    BatchReader,
    BatchWriter,
    NotABatchError,
)
from prf.data.inputs import detect_input, iter_samples
from prf.data.io import (
    PNG_GREY,
    PNG_RGB,
    ImageReadError,
    atomic_write_json,
    fast_jpeg,
    fast_png,
    jpeg_frame,
    read_image_rgb,
    read_label_png,
    write_png,
)

METADATA = {
    "generator": {"backend": "render", "steps": 2, "resolution": 32},
    "smal_layout": {"num_joints": 35, "num_betas": 41},
    "categories": [
        {"id": 0, "name": "dog", "supercategory": 1},
        {"id": 1, "name": "cat", "supercategory": 0},
    ],
}


def make_annotation(seed: int) -> Annotation:
    rng = np.random.default_rng(seed)
    return Annotation.from_dict(
        {
            "img_path": "unset",
            "bbox": [1.0, 1.0, 30.0, 30.0],
            "width": 32,
            "height": 32,
            "keypoint_2d": rng.uniform(0, 32, (26, 3)),
            "keypoint_3d": rng.normal(0, 0.3, (26, 3)),
            "pose": rng.normal(0, 0.2, 105),
            "shape": rng.normal(0, 1, 20),
            "trans": [0.0, 0.0, 3.0],
            "category": seed % 2,
            "supercategory": 1 - seed % 2,
            "camera": {"K": [[60, 0, 16], [0, 60, 16], [0, 0, 1]], "R": np.eye(3), "t": [0, 0, 3]},
            "viewpoint": {"azimuth": 0.1 * seed, "elevation": 0.2, "theta": 0.0, "distance": 3.0},
            "prompt": "An image of a dog, best quality, extremely detailed",
            "seed": 1000 + seed,
            "backend": "render",
            "category_name": ["dog", "cat"][seed % 2],
        },
        num_joints=35,
    )


def make_arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 11, (32, 32), dtype=np.uint8)
    condition = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return image, mask, condition


def write_one(writer: BatchWriter, seed: int, record: dict | None = None) -> str:
    image_id = f"img{seed:03d}"
    writer.write_image(image_id, *make_arrays(seed), make_annotation(seed), record or {"shard": "0/1"})
    return image_id


def make_batch(root: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> BatchWriter:
    writer = BatchWriter(root, METADATA)
    for seed in seeds:
        record: dict = {}
        if seed == 1:
            record = {"injected_failure": "leg_swap", "failure_severity": 0.5, "failure_effect": 0.12}
        if seed == 2:  # writer-owned fields may be passed when they agree
            record = {"image_id": "img002", "width": 32, "height": 32}
        write_one(writer, seed, record)
    writer.finalize()
    return writer


def test_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    make_batch(root)
    reader = BatchReader(root)
    assert reader.source == "manifest" and len(reader) == 3
    assert reader.metadata["format_version"] == 1 and reader.metadata["generator"] == METADATA["generator"]
    assert list(reader.manifest.columns) == list(COLUMNS)
    assert reader.image_ids() == ["img000", "img001", "img002"]
    for seed in range(3):
        image_id = f"img{seed:03d}"
        image, mask, condition = make_arrays(seed)
        np.testing.assert_array_equal(reader.read_image(image_id), image)
        np.testing.assert_array_equal(reader.read_mask(image_id), mask)
        np.testing.assert_array_equal(reader.read_condition(image_id), condition)
        annotation = reader.read_annotation(image_id, num_joints=35, num_betas=41)
        expected = make_annotation(seed)
        assert (
            annotation.img_path == f"images/{image_id}.png"
            and annotation.mask_path == f"masks/{image_id}.png"
        )
        # the writer records the silhouette area it counts in the mask it writes
        assert annotation.mask_area == float(np.count_nonzero(mask))
        unset = {"img_path": "unset", "mask_path": None, "mask_area": None}
        assert annotation.model_copy(update=unset) == expected
        assert "injected_failure" not in json.loads(reader.annotation_path(image_id).read_text())
    row = reader.record("img001")
    assert row["injected_failure"] == "leg_swap" and row["failure_effect"] == 0.12
    assert row["category"] == "cat" and row["category_id"] == 1 and row["seed"] == 1001
    assert reader.record("img000")["injected_failure"] == "none" and reader.record("img000")["shard"] == "0/1"
    assert (row["width"], row["height"], row["image"]) == (32, 32, "images/img001.png")
    with pytest.raises(KeyError, match="not in batch"):
        reader.record("nope")
    assert reader.mask_path("img002") == tmp_path / "batch" / "masks" / "img002.png"
    with pytest.raises(KeyError, match="not in batch"):
        reader.image_path("nope")


def test_finalize_is_deterministic(tmp_path: Path) -> None:
    make_batch(tmp_path / "a", seeds=(0, 1, 2))
    first = (tmp_path / "a" / "manifest.parquet").read_bytes()
    BatchWriter(tmp_path / "a", METADATA).finalize()
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == first
    make_batch(tmp_path / "b", seeds=(2, 0, 1))  # other write order, same content
    assert (tmp_path / "b" / "manifest.parquet").read_bytes() == first


def test_resume_and_is_done(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    writer = BatchWriter(root, METADATA)
    done = write_one(writer, 0)
    assert writer.is_done(done) and not writer.is_done("img001")
    resumed = BatchWriter(root, dict(METADATA, runtime={"host": "elsewhere"}))  # same config: resume
    assert resumed.is_done(done)
    assert resumed.metadata["created"] == writer.metadata["created"]
    (root / "images" / f"{done}.png").unlink()
    assert not resumed.is_done(done)
    write_one(resumed, 0)
    assert resumed.is_done(done)


def test_crash_between_files_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "batch"
    writer = BatchWriter(root, METADATA)
    real_replace = prf_io.os.replace

    def crash_on_condition(src: str, dst: str | Path) -> None:
        if "conditions" in str(dst):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(prf_io.os, "replace", crash_on_condition)
    with pytest.raises(OSError, match="simulated crash"):
        write_one(writer, 0)
    monkeypatch.undo()
    assert (root / "images" / "img000.png").is_file()  # written before the crash
    assert not (root / "conditions" / "img000.png").exists()
    assert not (root / "records" / "img000.json").exists()
    assert not list(root.rglob("*.tmp"))
    assert not writer.is_done("img000")
    assert writer.finalize().empty
    write_one(writer, 0)  # the resume rewrites it
    assert writer.is_done("img000")


def test_stray_temporary_files_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    writer = make_batch(root, seeds=(0,))
    (root / "records" / ".img009.json.x1.tmp").write_text("{")
    (root / "images" / ".img009.png.x2.tmp").write_bytes(b"\x89PNG")
    assert not writer.is_done("img009")
    assert list(writer.finalize()["image_id"]) == ["img000"]


def test_threaded_writes(tmp_path: Path) -> None:
    writer = BatchWriter(tmp_path / "batch", METADATA)
    with ThreadPoolExecutor(max_workers=3) as pool:
        ids = list(pool.map(lambda s: write_one(writer, s), range(6)))
    assert all(writer.is_done(i) for i in ids)
    assert list(writer.finalize()["image_id"]) == sorted(ids)


def test_different_metadata_is_refused_and_overwrite_restarts(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    make_batch(root, seeds=(0,))
    other = dict(METADATA, generator={**METADATA["generator"], "steps": 20})
    with pytest.raises(ValueError, match=r"generator\.steps: 2 in the existing batch, 20 now"):
        BatchWriter(root, other)
    fresh = BatchWriter(root, other, overwrite=True)
    assert not fresh.is_done("img000") and not (root / "manifest.parquet").exists()
    assert fresh.metadata["generator"]["steps"] == 20


def test_a_second_writer_accepts_a_folder_another_writer_is_claiming(tmp_path: Path) -> None:
    # `prf generate --devices 2`: shard writers start together; one may find only the other's temporary
    # batch.json (its claim in progress) in the folder, which is not foreign content.
    root = tmp_path / "batch"
    root.mkdir()
    (root / ".batch.json.new.12345.tmp").write_text("{}")
    # ... or the temporary file that claim is written through (atomic_write_json's name for it)
    (root / "..batch.json.new.12346.tmp.k2j4x.tmp").write_text("{")
    writer = BatchWriter(root, METADATA)
    assert (root / "batch.json").is_file() and writer.metadata["generator"] == METADATA["generator"]
    BatchWriter(root, METADATA)  # and one arriving after the claim joins the same batch


def _start_writer(root: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        BatchWriter(root, METADATA)
        results.put("ok")
    except Exception as err:  # reported to the test, which names it
        results.put(f"{type(err).__name__}: {err}")


def test_writers_starting_together_on_a_new_folder_all_join_the_batch(tmp_path: Path) -> None:
    # `prf generate --devices N` and shards on a shared disk: N writers create the same new folder at once
    context = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(6):
        barrier, results = context.Barrier(4), context.Queue()
        workers = [
            context.Process(target=_start_writer, args=(str(tmp_path / f"b{round_}"), barrier, results))
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        outcomes += [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join()
    assert outcomes == ["ok"] * len(outcomes), [o for o in outcomes if o != "ok"]


def test_writer_refuses_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.txt").write_text("mine")
    with pytest.raises(NotABatchError, match="not empty"):
        BatchWriter(tmp_path / "full", METADATA)
    writer = BatchWriter(tmp_path / "batch", METADATA)
    image, mask, condition = make_arrays(0)
    annotation = make_annotation(0)
    with pytest.raises(ValueError, match="invalid image id"):
        writer.write_image("../evil", image, mask, condition, annotation, {})
    with pytest.raises(ValueError, match="image must be a non-empty uint8"):
        writer.write_image("a", image.astype(np.float32), mask, condition, annotation, {})
    with pytest.raises(ValueError, match="not a FINE_PARTS index"):
        writer.write_image("a", image, mask + 20, condition, annotation, {})
    with pytest.raises(ValueError, match=r"disagree: width=64 \(writer: 32\)"):
        writer.write_image("a", image, mask, condition, annotation, {"width": 64})
    with pytest.raises(ValueError, match="unknown fields"):
        writer.write_image("a", image, mask, condition, annotation, {"colour": "red"})
    with pytest.raises(ValueError, match="seed=5 but the annotation says 1000"):
        writer.write_image("a", image, mask, condition, annotation, {"seed": 5})
    with pytest.raises(ValueError, match="faithful image"):
        writer.write_image("a", image, mask, condition, annotation, {"failure_effect": 0.3})
    leaked = Annotation.from_dict({**annotation.to_json_dict(), "injected_failure": "leg_swap"})
    with pytest.raises(ValueError, match="belong in the record"):
        writer.write_image("a", image, mask, condition, leaked, {})
    assert not list((tmp_path / "batch" / "images").iterdir())


def test_reader_falls_back_to_records_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    writer = BatchWriter(root, METADATA)
    write_one(writer, 0)
    with pytest.warns(UserWarning, match="not finalized"):
        reader = BatchReader(root)
    assert reader.source == "records" and reader.image_ids() == ["img000"]
    writer.finalize()
    write_one(writer, 1)
    with pytest.warns(UserWarning, match="stale"):
        reader = BatchReader(root)
    assert reader.source == "records" and reader.image_ids() == ["img000", "img001"]
    writer.finalize()
    assert BatchReader(root).source == "manifest"


def test_reader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BatchReader(tmp_path / "missing")
    with pytest.raises(NotABatchError, match=r"neither batch\.json nor manifest\.parquet"):
        BatchReader(tmp_path)
    root = tmp_path / "batch"
    make_batch(root, seeds=(0,))
    (root / "annotations" / "img000.json").write_text(json.dumps({"img_path": "x"}))
    with pytest.raises(AnnotationError) as info:
        BatchReader(root).read_annotation("img000")
    assert info.value.path == root / "annotations" / "img000.json" and info.value.field is not None


def test_manifest_paths_must_stay_inside_the_batch(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    make_batch(root, seeds=(0,))
    reader = BatchReader(root)
    assert reader.resolve("img000", "images/img000.png") == root / "images" / "img000.png"
    assert reader.resolve("img000", "./images//img000.png") == root / "images" / "img000.png"
    for escaping in ("/etc/passwd", "../other/img000.png", "images/../../img000.png", ".."):
        with pytest.raises(NotABatchError, match=r"leaves the batch folder") as info:
            reader.resolve("img000", escaping)
        assert str(root) in str(info.value) and "img000" in str(info.value)
    for missing in ("", None, float("nan")):
        with pytest.raises(NotABatchError, match="is not a path"):
            reader.resolve("img000", missing)  # type: ignore[arg-type]


def test_detect_input_and_iter_samples_on_all_kinds(tmp_path: Path) -> None:
    root = tmp_path / "batch"
    make_batch(root)
    folder = tmp_path / "folder"
    folder.mkdir()
    a3d = tmp_path / "a3d"
    (a3d / "images").mkdir(parents=True)
    entries = []
    for seed in range(2):
        image = make_arrays(seed)[0]
        write_png(folder / f"x{seed}.png", image)
        write_png(a3d / "images" / f"y{seed}.png", image)
        annotation = make_annotation(seed).model_copy(update={"img_path": f"images/y{seed}.png"})
        atomic_write_json(folder / f"x{seed}.json", annotation.to_json_dict())
        entries.append(annotation.to_json_dict())
    atomic_write_json(a3d / "train.json", {"data": entries})

    assert detect_input(root) == "batch"
    assert detect_input(folder) == "image_folder"
    assert detect_input(a3d / "train.json") == "animal3d_json"

    batch_refs = list(iter_samples(root))
    assert [r.image_id for r in batch_refs] == ["img000", "img001", "img002"]
    assert (
        batch_refs[1].extra["injected_failure"] == "leg_swap" and batch_refs[0].extra["failure_effect"] == 0.0
    )
    assert batch_refs[2].load_annotation(num_joints=35).seed == 1002
    np.testing.assert_array_equal(batch_refs[1].read_image(), make_arrays(1)[0])
    for path in (folder, a3d / "train.json"):
        refs = list(iter_samples(path))
        assert [r.source_index for r in refs] == [0, 1]
        np.testing.assert_array_equal(refs[1].read_image(), make_arrays(1)[0])
        assert refs[1].load_annotation(num_joints=35).seed == 1001


def test_batch_samples_read_in_chunks_match_one_pass(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "batch"
    make_batch(root)
    whole = list(iter_samples(root))
    monkeypatch.setattr(inputs, "_MANIFEST_CHUNK", 2)  # three rows: a chunk of two, then one
    chunked = list(iter_samples(root))
    assert [(r.image_id, r.source_index) for r in chunked] == [("img000", 0), ("img001", 1), ("img002", 2)]
    assert [(r.image_path, r.annotation_path, r.extra) for r in chunked] == [
        (r.image_path, r.annotation_path, r.extra) for r in whole
    ]


def test_detect_input_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        detect_input(tmp_path / "nothing")
    with pytest.raises(ValueError, match="0 images"):
        detect_input(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a recognised input"):
        detect_input(tmp_path / "notes.txt")
    (tmp_path / "single.json").write_text(json.dumps({"img_path": "a.png"}))
    with pytest.raises(ValueError, match="not an Animal3D JSON"):
        detect_input(tmp_path / "single.json")


def test_empty_batch_finalizes(tmp_path: Path) -> None:
    frame = BatchWriter(tmp_path / "batch", METADATA).finalize()
    assert frame.empty and list(frame.columns) == list(COLUMNS)
    reader = BatchReader(tmp_path / "batch")
    assert len(reader) == 0 and reader.source == "manifest"
    assert isinstance(reader.manifest, pd.DataFrame)


# ---- prf.data.io ----------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_truncated_png(tmp_path: Path) -> None:
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
        read_image_rgb(path)
    assert info.value.path == path


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "zero bytes"), (b"hello, I am text\n", "not an image")],
)
def test_empty_and_text_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_image_rgb(path)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image_rgb(tmp_path / "absent.png")


@pytest.mark.parametrize("size", [(20000, 20000), (9000, 9000)])
def test_huge_header_is_refused_without_allocating(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(header_only_png(*size))
    # "too large" (not "truncated") shows the header check fired before any decoding was tried.
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="too large"):
            read_image_rgb(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_sixteen_bit_rgba_and_grayscale_become_rgb_uint8(tmp_path: Path) -> None:
    sixteen = np.array([[0, 65535], [128 * 257, 1000]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    out = read_image_rgb(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 4]])
    assert np.all(out[..., 0] == out[..., 2])

    rgb16 = np.full((2, 3, 3), 40000, dtype=np.uint16)
    rgb16[0, 0] = [65535, 0, 257 * 10]
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    out = read_image_rgb(tmp_path / "rgb16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 10])
    np.testing.assert_array_equal(out[1, 2], [156, 156, 156])

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 255, 0, 128
    write_png(tmp_path / "rgba.png", rgba)
    out = read_image_rgb(tmp_path / "rgba.png")
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [100, 50, 25])

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_png(tmp_path / "gray.png", gray)
    out = read_image_rgb(tmp_path / "gray.png")
    assert out.shape == (3, 4, 3) and np.all(out == gray[..., None])
    np.testing.assert_array_equal(read_label_png(tmp_path / "gray.png"), gray)
    with pytest.raises(ImageReadError, match="label image"):
        read_label_png(tmp_path / "rgba.png")


def test_writers_refuse_bad_arrays_and_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"must end in \.png"):
        write_png(tmp_path / "f.jpg", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        atomic_write_json(tmp_path / "f.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_fast_png_path_is_used_and_gives_pillows_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    gamma = PngImagePlugin.PngInfo()
    gamma.add(b"gAMA", (45455).to_bytes(4, "big"))  # Pillow ignores gamma: the fast path must too
    Image.fromarray(rgb).save(tmp_path / "gamma.png", pnginfo=gamma)
    Image.fromarray(rgb).save(tmp_path / "keyed.png", transparency=(1, 2, 3))  # tRNS, still RGB
    Image.fromarray(grey).save(tmp_path / "grey.png")
    for name in ("gamma.png", "keyed.png"):
        assert fast_png(tmp_path / name, PNG_RGB) is not None  # imagecodecs is installed and used
        np.testing.assert_array_equal(read_image_rgb(tmp_path / name), rgb)
        with Image.open(tmp_path / name) as image:
            np.testing.assert_array_equal(read_image_rgb(tmp_path / name), np.asarray(image.convert("RGB")))
    assert fast_png(tmp_path / "grey.png", PNG_GREY) is not None
    np.testing.assert_array_equal(read_label_png(tmp_path / "grey.png"), grey)
    # other layouts are left to Pillow
    assert fast_png(tmp_path / "grey.png", PNG_RGB) is None
    assert fast_png(tmp_path / "gamma.png", PNG_GREY) is None
    assert fast_png(tmp_path / "gamma.png", PNG_RGB, max_side=40) is None


def _photo_like(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus noise, so JPEG codes real detail (not flat blocks)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = np.stack([x * 3, y * 2, (x + y) * 2], axis=2) % 256
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_fast_jpeg_path_is_used_and_gives_pillows_pixels(tmp_path: Path) -> None:
    rgb = _photo_like((45, 61), seed=4)  # sides that are not multiples of the 8 / 16 px blocks
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90": neither path applies it
    Image.fromarray(rgb).save(tmp_path / "baseline.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "progressive.jpg", quality=75, progressive=True)
    Image.fromarray(rgb).save(tmp_path / "exif.jpeg", quality=95, exif=exif)  # APP1 before the frame
    Image.fromarray(rgb).save(tmp_path / "no_subsampling.jpg", quality=95, subsampling=0)
    Image.fromarray(rgb[:, :, 1]).save(tmp_path / "grey.jpg", quality=90)
    for name in ("baseline.jpg", "progressive.jpg", "exif.jpeg", "no_subsampling.jpg", "grey.jpg"):
        path = tmp_path / name
        fast = fast_jpeg(path)
        assert fast is not None, name  # imagecodecs is installed and takes the file
        assert fast.shape == (45, 61, 3) and fast.dtype == np.uint8
        np.testing.assert_array_equal(read_image_rgb(path), _pillow_rgb(path), err_msg=name)
    assert jpeg_frame((tmp_path / "exif.jpeg").read_bytes()) == (8, 45, 61, 3)
    assert jpeg_frame((tmp_path / "grey.jpg").read_bytes()) == (8, 45, 61, 1)


def test_jpegs_the_fast_path_leaves_to_pillow(tmp_path: Path) -> None:
    rgb = _photo_like((40, 48), seed=5)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=90)
    data = (tmp_path / "plain.jpg").read_bytes()
    (tmp_path / "trailing.jpg").write_bytes(data + b"\x00" * 7)  # bytes after the end-of-image marker
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) - 200])
    (tmp_path / "no_frame.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xd9")
    Image.fromarray(rgb).save(tmp_path / "image.png")
    for name in ("cmyk.jpg", "trailing.jpg", "truncated.jpg", "no_frame.jpg", "image.png"):
        assert fast_jpeg(tmp_path / name) is None, name
    assert fast_jpeg(tmp_path / "plain.jpg", max_side=47) is None  # 48 px wide
    assert jpeg_frame(b"\x89PNG\r\n\x1a\n") is None
    # Pillow then decides: CMYK and trailing bytes decode as before, truncated data is a named error
    for name in ("cmyk.jpg", "trailing.jpg"):
        np.testing.assert_array_equal(read_image_rgb(tmp_path / name), _pillow_rgb(tmp_path / name))
    with pytest.raises(ImageReadError, match="truncated or corrupt") as err:
        read_image_rgb(tmp_path / "truncated.jpg")
    assert err.value.path == tmp_path / "truncated.jpg"
    with pytest.raises(ImageReadError, match="too large"):
        read_image_rgb(tmp_path / "plain.jpg", max_side=47)


def test_corrupt_png_data_is_an_error_not_garbage(tmp_path: Path) -> None:
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)  # compressible: real deflate codes
    data = bytearray(png_bytes(np.repeat(ramp[:, :, None], 3, axis=2)))
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed pixels
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(data))
    assert fast_png(path, PNG_RGB) is None
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image_rgb(path)


def test_manifest_records_equal_pandas_records() -> None:
    frame = pd.DataFrame(
        {
            "image_id": pd.array(["a", "b", None], dtype="string"),  # NA-backed strings: None, as pandas
            "category_id": pd.array([1, None, 3], dtype="Int64"),
            "category": pd.array(["x", None, "z"], dtype=pd.StringDtype(na_value=np.nan)),  # NaN-backed
            "seed": np.array([1, 2, 3], dtype=np.int64),
            "failure_effect": [0.5, float("nan"), 1.0],
            "flag": [True, False, True],
            "extra": [[1, 2], None, {"k": np.int64(3)}],
        }
    )
    ours = inputs._records(frame)
    theirs = frame.to_dict("records")
    assert len(ours) == len(theirs) == 3
    for mine, pandas_row in zip(ours, theirs, strict=True):
        assert list(mine) == list(pandas_row)
        for key, value in pandas_row.items():
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(mine[key]), key
            else:
                assert mine[key] == value and type(mine[key]) is type(value), key
    assert inputs._records(frame.iloc[:0]) == []
