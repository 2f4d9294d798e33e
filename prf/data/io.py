"""File helpers shared by the BATCH reader/writer: atomic writes and defensive image reading.

Atomic write: the bytes go to a hidden temporary file in the destination folder, which is then renamed over
the final name with ``os.replace`` (atomic on POSIX within one file system). A crash leaves either the old
file, the new file, or a stray ``.<name>.<random>.tmp`` -- never a partial file under the final name.

Image reading checks the header before decoding (Pillow's lazy ``Image.open`` only reads the header), so a
file that claims to be 20000 x 20000 is refused without allocating its pixels. The common cases of scoring
take fast paths (imagecodecs) instead. PNGs are written by ``prf.data.png.encode_png`` (Sub-filtered rows,
libdeflate), whose files ``decode_png`` reads back in 0.51 ms per 256 x 256 RGB image. Any other 8-bit RGB
PNG image or greyscale PNG mask is decoded by libspng (measured per 256 x 256 image in scoring's loop,
1.71 -> 1.10 ms for the image and 0.39 -> 0.24 ms for its mask). An 8-bit greyscale or colour JPEG
(Animal3D's images, a BATCH made with ``image_format: jpg``) whose data ends in its end-of-image marker is
decoded by libjpeg-turbo without Pillow's wrapping (0.68 -> 0.47 ms per 256 x 256 image). The pixels equal
Pillow's (tested). Anything else, and any problem, takes the Pillow path, which names the problem.
Legend: H height, W width (pixels).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from prf.data.png import PNG_SIGNATURE, decode_png, encode_png

try:  # the fast paths only; without them every image takes the Pillow path
    from imagecodecs import jpeg8_decode as _jpeg_decode
    from imagecodecs import spng_decode as _spng_decode
except ImportError:  # pragma: no cover - imagecodecs is a dependency
    _jpeg_decode = _spng_decode = None

MAX_IMAGE_SIDE = 8192  # pixels; images whose header claims a larger side are refused undecoded
_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
PNG_GREY, PNG_RGB = 0, 2  # IHDR colour types of the fast path
_JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker and the first byte of the next marker
_JPEG_EOI = b"\xff\xd9"
# start-of-frame markers (every coding process); C4 (DHT), C8 (reserved) and CC (DAC) are not frames
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageReadError(ValueError):
    """An image file could not be read; ``path`` names the file and the message says why."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def check_output_file(path: str | os.PathLike[str], option: str, example: str = "") -> None:
    """Refuse, before any work, an output FILE path ``option`` (e.g. ``--out``) that cannot be written: a
    folder, a path under a file, or one whose nearest existing folder is not writable. ``example``: a
    file name to suggest inside the folder."""
    path = Path(path)
    if path.is_dir():
        hint = f" ({path / example})" if example else ""
        raise ValueError(f"{option} {path} is a folder; give the file to write{hint}")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: cannot create it ({parent} is not a writable folder)")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    The parent folder must exist. Returns the final path.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON atomically. NaN and infinity are refused (they are not valid JSON)."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"cannot write {path} as JSON (NaN/inf and non-JSON types are refused): {err}"
        ) from err
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def json_normalise(obj: Any, what: str = "value") -> Any:
    """``obj`` in plain JSON types (tuples become lists); ValueError if not JSON without NaN/inf."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable without NaN/inf: {err}") from err


def json_diff(
    old: Any, new: Any, old_name: str = "before", new_name: str = "after", prefix: str = ""
) -> list[str]:
    """Human-readable differences between two JSON values, one line per differing (dotted) key."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: absent {old_name}, {new[key]!r} {new_name}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} {old_name}, absent {new_name}")
            else:
                out.extend(json_diff(old[key], new[key], old_name, new_name, name))
        return out
    return [] if old == new else [f"{prefix or '<root>'}: {old!r} {old_name}, {new!r} {new_name}"]


def _check_writable_array(path: Path, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"cannot write {path}: expected a uint8 array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"cannot write {path}: expected shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot write {path}: the image is empty (shape {array.shape})")
    return np.ascontiguousarray(array)


def write_image(path: str | os.PathLike[str], array: np.ndarray, jpeg_quality: int = 95) -> Path:
    """Encode a uint8 array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` and write it atomically.

    The format follows the suffix: ``.png`` (lossless) or ``.jpg`` / ``.jpeg`` (``jpeg_quality``).
    """
    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path}: unsupported suffix (use one of {sorted(_WRITE_FORMATS)})")
    array = _check_writable_array(path, array)
    if fmt == "JPEG" and array.ndim == 3 and array.shape[2] == 4:
        raise ValueError(f"cannot write {path}: JPEG has no alpha channel; pass (H, W, 3)")
    if fmt == "PNG":
        return atomic_write_bytes(path, encode_png(array))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=jpeg_quality)
    return atomic_write_bytes(path, buffer.getvalue())


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as a PNG, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"cannot write {path} with write_png: the name must end in .png")
    return write_image(path, array)


def _open_checked(path: Path, max_side: int) -> Image.Image:
    """Open lazily (header only) and refuse missing, empty, unrecognised or oversized files."""
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty (zero bytes)")
    try:
        image = Image.open(path)
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not an image (Pillow does not recognise the format)") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"unreadable header: {err}") from err
    width, height = image.size
    if width > max_side or height > max_side or width <= 0 or height <= 0:
        image.close()
        raise ImageReadError(
            path,
            f"too large or degenerate: the header says {width} x {height} pixels (limit {max_side} a side)",
        )
    return image


class _ShortPixelDataError(Exception):
    """A PNG whose complete compressed stream holds fewer rows than its header says. Pillow would pad the
    missing rows with black and report nothing, so the fast path names the problem itself."""


def _fast_decode(path: Path, max_side: int, png_colour_type: int | None, jpeg: bool) -> np.ndarray | None:
    """The fast paths behind one open of the file: a PNG of IHDR ``png_colour_type`` (None: no PNG) or,
    when ``jpeg``, a JPEG. None for any other file and for any problem (the Pillow path reports it),
    except a PNG pixel stream shorter than its header says (ImageReadError: Pillow would pad it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)  # PNG: signature, IHDR length and type, width, height, depth, colour
            if png_colour_type is not None and head.startswith(PNG_SIGNATURE):
                return _png_pixels(head, handle, png_colour_type, max_side)
            if jpeg and head.startswith(_JPEG_SOI):
                return _jpeg_pixels(head + handle.read(), max_side)
    except _ShortPixelDataError as err:
        raise ImageReadError(path, f"truncated or corrupt image data ({err})") from None
    except Exception:  # any other problem: the Pillow path reports it
        return None
    return None


def _png_pixels(head: bytes, handle: Any, colour_type: int, max_side: int) -> np.ndarray | None:
    """``fast_png``'s checks and decode, given the first 26 bytes and the open file for the rest."""
    if len(head) < 26 or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    fits = 0 < width <= max_side and 0 < height <= max_side
    if head[24] != 8 or head[25] != colour_type or not fits:
        return None
    data = head + handle.read()
    ours = decode_png(data, colour_type, max_side)  # the files encode_png writes: no libspng needed
    if ours is not None or _spng_decode is None:
        return ours
    try:
        pixels = _spng_decode(data)
    except Exception as err:
        if "IDAT stream too short" in str(err):  # libspng's words for that case (see _ShortPixelDataError)
            raise _ShortPixelDataError(
                "the compressed pixels end before the last row the header promises"
            ) from err
        raise
    expected = (height, width) if colour_type == PNG_GREY else (height, width, 3)
    return pixels if pixels.shape == expected and pixels.dtype == np.uint8 else None


def _jpeg_pixels(data: bytes, max_side: int) -> np.ndarray | None:
    """``fast_jpeg``'s checks and decode, given the whole file."""
    frame = jpeg_frame(data)
    if _jpeg_decode is None or frame is None or not data.endswith(_JPEG_EOI):
        return None
    precision, height, width, components = frame
    fits = 0 < width <= max_side and 0 < height <= max_side
    if precision != 8 or components not in (1, 3) or not fits:
        return None
    pixels = _jpeg_decode(data)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels if pixels.shape == (height, width, 3) and pixels.dtype == np.uint8 else None


def fast_png(path: Path, colour_type: int, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray | None:
    """An 8-bit PNG of IHDR ``colour_type`` (``PNG_GREY``: (H, W), ``PNG_RGB``: (H, W, 3) uint8) decoded
    by ``prf.data.png.decode_png`` (the files this toolkit writes) or libspng, or None for any other file
    and for any problem (missing, truncated, corrupt, a side over ``max_side``, a decoder that gives
    another layout): the caller then takes the Pillow path, which decides and names the problem. Pixels
    equal Pillow's (tested). One problem is raised here as ImageReadError: a complete compressed stream
    with fewer rows than the header says, which Pillow would pad with black."""
    return _fast_decode(path, max_side, colour_type, jpeg=False)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(sample precision in bits, height, width, components) from a JPEG's first start-of-frame segment,
    or None when ``data`` is not a JPEG or its header ends (or the scan starts) before a frame header."""
    if not data.startswith(_JPEG_SOI):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 10 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return data[pos + 4], height, width, data[pos + 9]
        pos += 2 + length
    return None


def fast_jpeg(path: Path, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray | None:
    """An 8-bit JPEG of 1 (greyscale, replicated) or 3 (colour) components decoded by libjpeg-turbo as
    (H, W, 3) uint8 RGB, or None for any other file and for any doubt: a header this parser does not
    follow, a side over ``max_side``, CMYK, 12-bit, and data that does not end in the end-of-image marker
    (libjpeg fills a truncated scan with grey where Pillow refuses the file). The caller then takes the
    Pillow path, which decides and names the problem. Pixels equal Pillow's (tested); EXIF orientation is
    not applied, as on the Pillow path."""
    return _fast_decode(path, max_side, None, jpeg=True)


def _decode(path: Path, image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(path, f"truncated or corrupt image data ({err})") from err


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, colour times alpha (transparent pixels become black)."""
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    return ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _high_depth_to_uint8(path: Path, image: Image.Image) -> np.ndarray:
    """Single-channel 16/32-bit integer image -> (H, W) uint8 (16-bit range scaled down to 8 bits)."""
    values = np.asarray(image)
    if image.mode == "F":
        raise ImageReadError(path, "32-bit float images are not supported; save it as 8-bit RGB")
    if image.mode.startswith("I;16") or int(values.max(initial=0)) > 255:
        scaled = np.clip(values.astype(np.int64), 0, 65535)
        return ((scaled * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def read_image_rgb(path: str | os.PathLike[str], max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    Grayscale is replicated to three channels; RGBA / LA / palette-with-transparency are composited on
    black (as 3D-DST turns its transparent renders into conditions); 16-bit images are scaled to 8 bits
    (32-bit integer grayscale is taken as 16-bit when a value exceeds 255, else as 8-bit).
    EXIF orientation is not applied (annotations refer to the stored pixel grid).

    Raises:
        ImageReadError: missing, zero-byte, unrecognised, truncated or corrupt file, float images, or a
            header that claims a side longer than ``max_side`` pixels (refused before decoding).
    """
    path = Path(path)
    pixels = _fast_decode(path, max_side, PNG_RGB, jpeg=True)  # one open for either fast path
    if pixels is not None:
        return pixels
    image = _open_checked(path, max_side)
    with image:
        _decode(path, image)
        mode = image.mode
        if mode == "P":
            mode = "RGBA" if "transparency" in image.info else "RGB"
            image_rgb = image.convert(mode)
        elif mode == "LA" or mode == "PA":
            mode = "RGBA"
            image_rgb = image.convert(mode)
        elif mode.startswith("I") or mode == "F":
            gray = _high_depth_to_uint8(path, image)
            return np.repeat(gray[:, :, None], 3, axis=2)
        elif mode in ("RGB", "RGBA"):
            image_rgb = image
        else:
            mode = "RGB"
            image_rgb = image.convert("RGB")
        array = np.asarray(image_rgb)
    if mode == "RGBA":
        return _composite_on_black(array)
    return np.ascontiguousarray(array, dtype=np.uint8)


def read_label_png(path: str | os.PathLike[str], max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read a label image (one uint8 label per pixel, e.g. a part mask) as ``(H, W)`` uint8.

    Accepts 8-bit grayscale and palette images (the palette indices are the labels); anything else is
    refused, since converting colours to labels would silently invent labels.
    """
    path = Path(path)
    pixels = fast_png(path, PNG_GREY, max_side)
    if pixels is not None:
        return pixels
    image = _open_checked(path, max_side)
    with image:
        _decode(path, image)
        if image.mode not in ("L", "P"):
            raise ImageReadError(
                path, f"expected a single-channel 8-bit label image (mode L or P), got mode {image.mode}"
            )
        return np.array(image, dtype=np.uint8)
