"""PNG encoding, and a fast decoding path for the PNGs it writes.

Why this exists: scoring decodes every image once, and on a small CPU the decode is a large part of the
input side. Pillow's encoder picks a row filter per row ("adaptive") and compresses with zlib; its files
need Up and Paeth unfiltering, which is sequential along each row. Measured per 256 x 256 RGB image of a
BATCH on the 2-core development machine (benchmarks/png_codec.py, 500 images; benchmarks/README.md):

- Pillow writes one in 25.8 ms; libspng decodes it in 1.10 ms, most of it zlib's inflate.
- ``encode_png`` filters every row with Sub (the difference to the pixel on the left) and compresses with
  libdeflate: 5.5 ms, and the files are 2.3% smaller.
- ``decode_png`` inflates with libdeflate into a buffer of the exact size and undoes Sub with one compiled
  cumulative sum along the rows (imagecodecs' delta decoder): 0.51 ms.

The files are ordinary PNGs that any reader decodes. ``decode_png`` takes only files of exactly that shape:
chunks IHDR, IDAT..., IEND and nothing else; 8-bit greyscale, RGB or RGBA; no interlacing; every row filtered
with None or Sub; every chunk's CRC and the zlib checksum right. For anything else it returns None and the
caller takes its general path (libspng, then Pillow), so a PNG from any other tool still decodes as before.
Legend: H height, W width, C channels (1, 3 or 4).
"""

from __future__ import annotations

import zlib

import numpy as np

try:  # libdeflate and a compiled cumulative sum; without them: zlib, numpy (same files, slower)
    from imagecodecs import deflate_decode as _inflate_exact
    from imagecodecs import deflate_encode as _deflate
    from imagecodecs import delta_decode as _cumsum_rows
except ImportError:  # pragma: no cover - imagecodecs is a dependency
    _inflate_exact = _cumsum_rows = None
    _deflate = zlib.compress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPE_CHANNELS = {0: 1, 2: 3, 6: 4}  # IHDR colour type -> channels: greyscale, RGB, RGBA
_CHANNELS_COLOUR_TYPE = {channels: colour for colour, channels in COLOUR_TYPE_CHANNELS.items()}
FILTER_NONE, FILTER_SUB = 0, 1  # PNG row filter types (the first byte of every row)
_PEEK_ROWS = 2  # rows inflated up front to tell a foreign file before inflating all of it


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC-32 of type and body."""
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """Encode uint8 pixels ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` as an 8-bit greyscale,
    RGB or RGBA PNG (lossless): every row Sub-filtered, one zlib stream at ``level`` (1-12 with
    libdeflate, 1-9 with zlib), no ancillary chunks."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"encode_png needs uint8 (H, W) or (H, W, C), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in _CHANNELS_COLOUR_TYPE or height == 0 or width == 0:
        raise ValueError(f"encode_png needs 1, 3 or 4 channels and a non-empty image, got {pixels.shape}")
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = FILTER_SUB
    filtered = rows[:, 1:].reshape(height, width, channels)  # a view into rows: only the last axis splits
    source = pixels.reshape(height, width, channels)
    filtered[:, 0] = source[:, 0]
    np.subtract(source[:, 1:], source[:, :-1], out=filtered[:, 1:])  # uint8: wraps modulo 256, as PNG wants
    # depth 8, colour type, compression 0 (deflate), filter method 0, no interlacing
    layout = bytes([8, _CHANNELS_COLOUR_TYPE[channels], 0, 0, 0])
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + layout
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _deflate(rows, level))
        + _chunk(b"IEND", b"")
    )


def _chunks(data: bytes) -> list[tuple[bytes, memoryview]] | None:
    """The (type, body) of every chunk up to IEND, or None when a length runs past the data, a CRC is wrong,
    or anything follows IEND."""
    view = memoryview(data)
    chunks: list[tuple[bytes, memoryview]] = []
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return None
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            return None
        kind = bytes(view[pos + 4 : pos + 8])
        chunks.append((kind, view[pos + 8 : end]))
        pos = end + 4
        if kind == b"IEND":
            return chunks if pos == len(data) else None
    return None


def _leading_filters_known(stream: bytes | memoryview, row_bytes: int, height: int) -> bool:
    """Whether the first rows' filters are None or Sub, inflating only those rows: a file from another
    encoder (Pillow's second row is Up or Paeth) is told apart for a few microseconds, not a full inflate."""
    rows = min(_PEEK_ROWS, height)
    try:
        head = zlib.decompressobj().decompress(stream, (rows - 1) * row_bytes + 1)
    except zlib.error:
        return False
    return len(head) > (rows - 1) * row_bytes and all(
        head[row * row_bytes] in (FILTER_NONE, FILTER_SUB) for row in range(rows)
    )


def decode_png(data: bytes, colour_type: int, max_side: int) -> np.ndarray | None:
    """Decode a PNG of the shape ``encode_png`` writes (module docstring): ``(H, W)`` uint8 for colour type
    0, ``(H, W, C)`` for 2 (RGB) and 6 (RGBA). None for any other file, any other colour type, a side over
    ``max_side``, and any damage (the caller's general path then decides and names the problem)."""
    if colour_type not in COLOUR_TYPE_CHANNELS or not data.startswith(PNG_SIGNATURE):
        return None
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return None
    header = bytes(chunks[0][1])
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    fits = 0 < width <= max_side and 0 < height <= max_side
    if not fits or header[8:] != bytes([8, colour_type, 0, 0, 0]):  # 8-bit, this colour type, no interlacing
        return None
    if any(kind not in (b"IDAT", b"IEND") for kind, _ in chunks[1:]):
        return None  # PLTE, tRNS, gAMA, text...: the general path knows what they mean
    parts = [body for kind, body in chunks if kind == b"IDAT"]
    if not parts:
        return None
    stream = parts[0] if len(parts) == 1 else b"".join(parts)
    channels = COLOUR_TYPE_CHANNELS[colour_type]
    row_bytes = width * channels + 1
    if not _leading_filters_known(stream, row_bytes, height):
        return None
    rows = _inflate(stream, height * row_bytes)
    if rows is None:
        return None
    rows = rows.reshape(height, row_bytes)
    filters = rows[:, 0]
    pixels = rows[:, 1:].copy().reshape(height, width, channels)  # writable; the filter bytes dropped
    sub = filters == FILTER_SUB
    if sub.all():
        _undo_sub(pixels)
    elif np.all(sub | (filters == FILTER_NONE)):
        pixels[sub] = _undo_sub(pixels[sub])
    else:
        return None  # Up, Average or Paeth rows further down: the general path unfilters those
    return pixels.reshape(height, width) if channels == 1 else pixels


def _inflate(stream: bytes | memoryview, size: int) -> np.ndarray | None:
    """The zlib stream inflated to exactly ``size`` bytes (uint8), or None when it is damaged or of any
    other length."""
    try:
        raw = _inflate_exact(stream, out=size) if _inflate_exact is not None else zlib.decompress(stream)
    except Exception:  # imagecodecs' DeflateError, zlib.error: damaged or too long
        return None
    return np.frombuffer(raw, dtype=np.uint8) if len(raw) == size else None


def _undo_sub(pixels: np.ndarray) -> np.ndarray:
    """Undo the Sub filter in place on ``(N, W, C)`` uint8 rows: a cumulative sum along W, modulo 256."""
    if _cumsum_rows is not None:
        return _cumsum_rows(pixels, axis=1, out=pixels)
    np.cumsum(pixels, axis=1, dtype=np.uint8, out=pixels)
    return pixels
