"""prf.data.png: the PNG encoder and its fast decoding path, against Pillow as the reference reader."""

from __future__ import annotations

import io
import itertools
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_batch import chunk

from prf.data import png
from prf.data.io import PNG_GREY, PNG_RGB, ImageReadError, fast_png, read_image_rgb, read_label_png, write_png
from prf.data.png import PNG_SIGNATURE, decode_png, encode_png

PNG_RGBA = 6
MAX_SIDE = 8192


def _pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _png_from_rows(width: int, height: int, colour_type: int, rows: bytes, idat_parts: int = 1) -> bytes:
    """A PNG around already-filtered rows (filter byte first in each), the stream split over IDAT chunks."""
    stream = zlib.compress(rows)
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour_type, 0, 0, 0])
    idats = b"".join(chunk(b"IDAT", stream[a:b]) for a, b in itertools.pairwise(cuts))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + idats + chunk(b"IEND", b"")


@pytest.mark.parametrize("shape", [(37, 53), (1, 9), (9, 1), (37, 53, 3), (1, 1, 3), (20, 31, 4)])
def test_round_trip_equals_the_pixels_and_pillow_reads_the_same(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels)
    colour_type = {2: PNG_GREY, 3: PNG_RGB}[len(shape)] if len(shape) == 2 or shape[2] == 3 else PNG_RGBA
    decoded = decode_png(data, colour_type, MAX_SIDE)
    assert decoded is not None and decoded.dtype == np.uint8 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, pixels)
    np.testing.assert_array_equal(_pillow_pixels(data), pixels)  # a standard PNG: another reader agrees


def test_smooth_images_compress_and_single_channel_arrays_are_greyscale() -> None:
    y, x = np.mgrid[0:64, 0:96]
    ramp = np.stack([x * 2, y * 3, x + y], axis=2).astype(np.uint8)
    data = encode_png(ramp)
    assert len(data) < ramp.nbytes / 10  # Sub turns a ramp into runs of one value
    np.testing.assert_array_equal(decode_png(data, PNG_RGB, MAX_SIDE), ramp)
    grey = encode_png(ramp[:, :, :1])
    np.testing.assert_array_equal(decode_png(grey, PNG_GREY, MAX_SIDE), ramp[:, :, 0])


def test_written_files_take_the_fast_path_in_the_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, (33, 47), dtype=np.uint8)
    write_png(tmp_path / "image.png", rgb)
    write_png(tmp_path / "mask.png", labels)

    def no_spng(data: bytes) -> np.ndarray:
        raise AssertionError("libspng was asked to decode a file encode_png wrote")

    monkeypatch.setattr("prf.data.io._spng_decode", no_spng)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "image.png"), rgb)
    np.testing.assert_array_equal(read_label_png(tmp_path / "mask.png"), labels)


def test_pillow_files_fall_back_to_the_general_path(tmp_path: Path) -> None:
    y, x = np.mgrid[0:40, 0:50]
    rgb = np.stack([x * 5, y * 6, (x * y) % 256], axis=2).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pillow.png")  # adaptive filters: Up / Paeth rows
    data = (tmp_path / "pillow.png").read_bytes()
    assert decode_png(data, PNG_RGB, MAX_SIDE) is None
    assert fast_png(tmp_path / "pillow.png", PNG_RGB) is not None  # libspng takes it
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "pillow.png"), rgb)


def test_rows_mixing_none_and_sub_decode_and_other_filters_are_declined() -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rows = []
    for index, row in enumerate(pixels.reshape(6, 15)):
        if index % 2:
            rows.append(bytes([0]) + row.tobytes())
        else:
            sub = row.copy()
            sub[3:] = row[3:] - row[:-3]
            rows.append(bytes([1]) + sub.tobytes())
    mixed = _png_from_rows(5, 6, PNG_RGB, b"".join(rows), idat_parts=3)
    np.testing.assert_array_equal(decode_png(mixed, PNG_RGB, MAX_SIDE), pixels)
    np.testing.assert_array_equal(_pillow_pixels(mixed), pixels)
    late_up = [*rows[:4], bytes([2]) + bytes(15), *rows[5:]]  # an Up row after the rows peeked at
    assert decode_png(_png_from_rows(5, 6, PNG_RGB, b"".join(late_up)), PNG_RGB, MAX_SIDE) is None


def _with_ancillary(data: bytes) -> bytes:
    end = data.index(b"IEND") - 4
    return data[:end] + chunk(b"tEXt", b"Comment\x00hello") + data[end:]


def test_damaged_and_unusual_files_are_declined(tmp_path: Path) -> None:
    pixels = np.random.default_rng(9).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    data = encode_png(pixels)
    idat = data.index(b"IDAT")
    flipped = bytearray(data)
    flipped[idat + 40] ^= 0x10  # a compressed byte; the chunk CRC no longer matches
    idat_length = int.from_bytes(data[idat - 4 : idat], "big")
    body = bytearray(data[idat + 4 : idat + 4 + idat_length])
    body[-6] ^= 0x01  # near the end of the stream, CRC recomputed: inflate or the zlib checksum must notice
    recrc = data[: idat - 4] + chunk(b"IDAT", bytes(body)) + data[idat + 8 + idat_length :]
    header = bytearray(data[16:29])  # IHDR body: width, height, depth, colour, methods
    header[4:8] = (25).to_bytes(4, "big")  # one row more than the stream holds
    taller = data[:8] + chunk(b"IHDR", bytes(header)) + data[33:]
    cases = {
        "flipped.png": bytes(flipped),
        "recrc.png": recrc,
        "truncated.png": data[: len(data) // 2],
    }
    for name, bad in cases.items():
        assert decode_png(bad, PNG_RGB, MAX_SIDE) is None, name
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(ImageReadError) as err:
            read_image_rgb(tmp_path / name)
        assert err.value.path == tmp_path / name
    assert decode_png(taller, PNG_RGB, MAX_SIDE) is None
    (tmp_path / "taller.png").write_bytes(taller)  # Pillow alone would pad the missing row with black
    with pytest.raises(ImageReadError, match="end before the last row"):
        read_image_rgb(tmp_path / "taller.png")
    mask = encode_png(pixels[:, :, 0])
    header = bytearray(mask[16:29])
    header[4:8] = (25).to_bytes(4, "big")
    (tmp_path / "taller_mask.png").write_bytes(mask[:8] + chunk(b"IHDR", bytes(header)) + mask[33:])
    with pytest.raises(ImageReadError, match="end before the last row"):
        read_label_png(tmp_path / "taller_mask.png")
    # sound files the fast path still leaves to the general one
    assert decode_png(_with_ancillary(data), PNG_RGB, MAX_SIDE) is None
    assert decode_png(data + b"\x00", PNG_RGB, MAX_SIDE) is None  # bytes after IEND (Pillow ignores them)
    assert decode_png(data, PNG_GREY, MAX_SIDE) is None  # the caller asked for another colour type
    assert decode_png(data, PNG_RGB, 29) is None  # 30 px wide
    assert decode_png(b"GIF89a", PNG_RGB, MAX_SIDE) is None
    (tmp_path / "text.png").write_bytes(_with_ancillary(data))
    (tmp_path / "trailing.png").write_bytes(data + b"\x00")
    for name in ("text.png", "trailing.png"):
        np.testing.assert_array_equal(read_image_rgb(tmp_path / name), pixels)


def test_encoder_refuses_what_png_cannot_hold() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channels"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        encode_png(np.zeros((0, 4), dtype=np.uint8))


def test_without_imagecodecs_the_same_files_come_from_zlib_and_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.random.default_rng(11).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    fast_file = encode_png(pixels)
    monkeypatch.setattr(png, "_deflate", zlib.compress)
    monkeypatch.setattr(png, "_inflate_exact", None)
    monkeypatch.setattr(png, "_cumsum_rows", None)
    slow_file = encode_png(pixels)
    for data in (fast_file, slow_file):
        np.testing.assert_array_equal(decode_png(data, PNG_RGB, MAX_SIDE), pixels)
    np.testing.assert_array_equal(_pillow_pixels(slow_file), pixels)


def test_strided_views_encode_like_their_copies() -> None:
    rgba = np.random.default_rng(13).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    views = {"rgb of rgba": rgba[:, :, :3], "transposed": rgba.transpose(1, 0, 2)[:, :, :3]}
    views |= {"every other pixel": rgba[::2, ::3, :3], "grey, transposed": rgba[:, :, 0].T}
    for name, view in views.items():
        assert encode_png(view) == encode_png(np.ascontiguousarray(view)), name
        colour_type = PNG_RGB if view.ndim == 3 else PNG_GREY
        np.testing.assert_array_equal(decode_png(encode_png(view), colour_type, MAX_SIDE), view, err_msg=name)
