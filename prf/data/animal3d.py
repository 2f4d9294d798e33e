"""Inputs that are not a BATCH: Animal3D annotation files and plain folders of annotated images.

Animal3D files are ``{"data": [sample, ...]}`` (train.json / test.json).

Reading validates every entry on its own: a broken entry is reported (its index and field) and the others
still load. Image paths in the file are relative to the JSON's folder unless an ``image_root`` is given.
Animal3D carries no intrinsics; ``Annotation.intrinsics()`` assumes a focal length of
``ANIMAL3D_DEFAULT_FOCAL_PX`` (1000 px, configurable) and the image centre for such samples.

An annotated image folder holds ``foo.png`` + ``foo.json`` (one Annotation per image). ``SampleRef`` is the
cheap per-sample reference that ``prf.data.batch.iter_samples`` yields for every input kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prf.data.annotation import ANIMAL3D_DEFAULT_FOCAL_PX, Annotation, AnnotationError
from prf.data.io import atomic_write_json, read_image_rgb

__all__ = [
    "ANIMAL3D_DEFAULT_FOCAL_PX",
    "Animal3DEntry",
    "Animal3DFile",
    "SampleRef",
    "image_folder_pairs",
    "iter_animal3d_samples",
    "iter_image_folder_samples",
    "load_animal3d_entries",
    "read_animal3d_json",
    "resolve_image_path",
    "write_animal3d_json",
]


@dataclass(frozen=True)
class Animal3DEntry:
    """One valid entry: its position in the file's ``data`` list and the validated annotation."""

    index: int
    annotation: Annotation


@dataclass
class Animal3DFile:
    """Result of reading an Animal3D JSON file.

    Attributes:
        path: the JSON file.
        entries: valid entries in file order.
        errors: one AnnotationError per broken entry (``error.index`` and ``error.field`` say where).
        extra: the file's other top-level keys (e.g. ``info``, ``categories``), verbatim.
    """

    path: Path
    entries: list[Animal3DEntry]
    errors: list[AnnotationError]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def annotations(self) -> list[Annotation]:
        return [entry.annotation for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Animal3DEntry]:
        return iter(self.entries)


def load_animal3d_entries(path: str | os.PathLike[str]) -> tuple[list[Any], dict[str, Any]]:
    """Parse an Animal3D JSON file without validating entries: ``(raw entries, other top-level keys)``.

    Accepts ``{"data": [...], ...}`` or a bare list of entries. Raises AnnotationError (naming the file)
    when the file is missing, not JSON, or has no ``data`` list.
    """
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise AnnotationError("Animal3D JSON file not found", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"cannot read the file ({err})", path) from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"not valid JSON ({err})", path) from None
    if isinstance(content, list):
        return content, {}
    if not isinstance(content, dict) or "data" not in content:
        kind = type(content).__name__
        keys = sorted(content)[:8] if isinstance(content, dict) else []
        raise AnnotationError(
            f"not an Animal3D file: expected an object with a 'data' list, got a {kind}"
            + (f" with keys {keys}" if keys else ""),
            path,
            "data",
        )
    data = content["data"]
    if not isinstance(data, list):
        raise AnnotationError(f"'data' must be a list of samples, got {type(data).__name__}", path, "data")
    return data, {k: v for k, v in content.items() if k != "data"}


def read_animal3d_json(
    path: str | os.PathLike[str], num_joints: int | None = None, num_betas: int | None = None
) -> Animal3DFile:
    """Read and validate an Animal3D JSON file entry by entry.

    Args:
        path: train.json / test.json (``{"data": [...]}``, extra top-level keys allowed).
        num_joints, num_betas: optional body-model checks (see ``Annotation.validate_for``).

    Returns:
        Animal3DFile with the valid entries and one error per broken entry (the file as a whole being
        unreadable raises AnnotationError instead).
    """
    path = Path(path)
    raw, extra = load_animal3d_entries(path)
    entries: list[Animal3DEntry] = []
    errors: list[AnnotationError] = []
    for index, item in enumerate(raw):
        try:
            annotation = Annotation.from_dict(item, path, index, num_joints, num_betas)
        except AnnotationError as err:
            errors.append(err)
            continue
        entries.append(Animal3DEntry(index, annotation))
    return Animal3DFile(path, entries, errors, extra)


def write_animal3d_json(
    path: str | os.PathLike[str],
    annotations: Iterable[Annotation | dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``{"data": [...], **extra}`` atomically with Animal3D field names (dicts are validated first).

    Used to write a stand-in "real" set; ``img_path`` values should be relative to ``path``'s folder.
    """
    path = Path(path)
    data = []
    for index, item in enumerate(annotations):
        annotation = item if isinstance(item, Annotation) else Annotation.from_dict(item, path, index)
        data.append(annotation.to_json_dict())
    extra = dict(extra or {})
    if "data" in extra:
        raise ValueError("extra top-level keys must not include 'data'")
    return atomic_write_json(path, {"data": data, **extra}, indent=None)


def resolve_image_path(
    json_path: str | os.PathLike[str], img_path: str, image_root: str | os.PathLike[str] | None = None
) -> Path:
    """Where an entry's image lives: ``img_path`` joined to ``image_root`` (default: the JSON's folder).

    An absolute ``img_path`` is kept as is.
    """
    base = Path(image_root) if image_root is not None else Path(json_path).parent
    candidate = Path(img_path)
    return candidate if candidate.is_absolute() else base / candidate


# ---- lazy sample references (no image decoding), shared with prf.data.batch.iter_samples ----------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class SampleRef:
    """A cheap reference to one annotated image of any input kind (nothing is decoded).

    Attributes:
        image_id: unique within its source.
        image_path: the image file (None when an Animal3D entry has no usable ``img_path``).
        annotation_path: the annotation JSON file, or None when the annotation is inline.
        annotation: the inline raw annotation (an Animal3D JSON entry), or None.
        source_index: position in the source (manifest row, ``data`` entry, sorted folder listing).
        source: "batch" | "animal3d_json" | "image_folder".
        source_path: the BATCH folder, the JSON file or the image folder.
        extra: source-specific fields (a batch's manifest columns, e.g. ``injected_failure``).
    """

    image_id: str
    image_path: Path | None
    annotation_path: Path | None
    annotation: Any
    source_index: int
    source: str
    source_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def load_annotation(self, num_joints: int | None = None, num_betas: int | None = None) -> Annotation:
        """The validated annotation (AnnotationError names the file, the entry index and the field)."""
        if self.annotation_path is not None:
            return Annotation.from_json_file(self.annotation_path, num_joints, num_betas)
        return Annotation.from_dict(
            self.annotation, self.source_path, self.source_index, num_joints, num_betas
        )

    def read_image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB (ImageReadError names the file)."""
        if self.image_path is None:
            raise AnnotationError(
                "entry has no usable 'img_path'", self.source_path, "img_path", self.source_index
            )
        return read_image_rgb(self.image_path)


def iter_animal3d_samples(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> Iterator[SampleRef]:
    """One SampleRef per ``data`` entry (unvalidated: ``load_annotation`` validates). Image ids are the
    image file stems, with ``-<index>`` appended to a stem seen before."""
    path = Path(path)
    raw, _ = load_animal3d_entries(path)
    seen: set[str] = set()
    for index, item in enumerate(raw):
        img = item.get("img_path") if isinstance(item, dict) else None
        image_path = resolve_image_path(path, img, image_root) if isinstance(img, str) and img else None
        image_id = image_path.stem if image_path is not None else f"entry-{index}"
        if image_id in seen:
            image_id = f"{image_id}-{index}"
        seen.add(image_id)
        yield SampleRef(image_id, image_path, None, item, index, "animal3d_json", path)


def image_folder_pairs(folder: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """(image, expected annotation ``<stem>.json``) pairs of a plain folder, sorted by name (not recursive).

    Raises ValueError if two images share a stem (``foo.png`` and ``foo.jpg`` would share ``foo.json``).
    """
    folder = Path(folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ValueError(
                f"{folder}: {stems[image.stem].name} and {image.name} would share {image.stem}.json"
            )
        stems[image.stem] = image
    return [(image, image.with_suffix(".json")) for image in images]


def iter_image_folder_samples(folder: str | os.PathLike[str]) -> Iterator[SampleRef]:
    """One SampleRef per image of a folder holding ``foo.png`` + ``foo.json`` pairs. An image without its
    JSON is still yielded; its ``load_annotation`` raises AnnotationError naming the missing file."""
    folder = Path(folder)
    for index, (image, annotation) in enumerate(image_folder_pairs(folder)):
        yield SampleRef(image.stem, image, annotation, None, index, "image_folder", folder)
