"""Read 3D-DST's own output layout, so KCF runs on rigid-object batches made with 3D-DST's public code.

Layout (one split folder, e.g. ``DST/train``, or one synset folder inside it)::

    <root>/<synset>/<model_id>/annotation/NNN.npy        np.save-d dict (a pickle inside a .npy)
    <root>/<synset>/<model_id>/image_render/NNN.png      the Blender render
    <root>/<synset>/<model_id>/<generated>/NNN_SS.png    diffusion output, sample SS of render NNN

Annotation keys used (names as written by 3D-DST's Blender script): ``theta`` (azimuth, radians), ``phi``
(polar angle from the +z axis, radians; elevation = pi/2 - phi), ``camera_rotation`` (in-plane, radians;
0 in their code, treated as 0 when absent) and ``dist`` (camera distance, not used by KCF). The labels are
those of 3D-DST's KCF loader: azimuth = theta, elevation = pi/2 - phi, in-plane theta = camera_rotation.

The .npy files are read with ``prf.body.pickle_io.load_pickle_restricted`` (numpy values and builtins
only); a file that names any other class is refused before anything in it runs and becomes an error row.

Image ids: ``<synset>_<model_id>_<NNN_SS>``; the generated-image folder is detected (the one folder beside
``annotation`` other than ``image_render`` / ``depth``), or named with ``dst_images``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from kcf.data import ItemError, KCFItem
from prf.body.pickle_io import SMALFileError, load_pickle_restricted

ANNOTATION_DIR = "annotation"
NON_GENERATED_DIRS = frozenset({ANNOTATION_DIR, "image_render", "depth"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SAMPLE_STEM = re.compile(r"^(?P<render>.+?)(?:_(?P<sample>\d+))?$")


def _model_dirs(root: Path) -> list[tuple[str, Path]]:
    """(synset, model folder) pairs: ``root/<synset>/<model_id>/annotation`` or ``root/<model_id>/...``."""
    if not root.is_dir():
        return []
    nested = sorted(p.parent for p in root.glob(f"*/*/{ANNOTATION_DIR}") if p.is_dir())
    if nested:
        return [(p.parent.name, p) for p in nested]
    flat = sorted(p.parent for p in root.glob(f"*/{ANNOTATION_DIR}") if p.is_dir())
    return [(root.name, p) for p in flat]


def is_threedst_root(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder in 3D-DST's layout (holds ``[<synset>/]<model_id>/annotation/*.npy``)."""
    path = Path(path)
    if not path.is_dir() or (path / "batch.json").is_file() or (path / "manifest.parquet").is_file():
        return False
    return any(next(model.joinpath(ANNOTATION_DIR).glob("*.npy"), None) for _, model in _model_dirs(path))


def detect_generated_folder(root: str | os.PathLike[str]) -> str:
    """The generated-image folder name shared by the model folders (see the module docstring)."""
    names: set[str] = set()
    for _, model in _model_dirs(Path(root)):
        names.update(p.name for p in model.iterdir() if p.is_dir() and p.name not in NON_GENERATED_DIRS)
    if len(names) == 1:
        return names.pop()
    if not names:
        raise ValueError(
            f"{root}: no generated-image folder beside 'annotation' (only {sorted(NON_GENERATED_DIRS)}); "
            "generate images first, or pass dst_images='image_render' to run KCF on the renders"
        )
    raise ValueError(
        f"{root}: several image folders beside 'annotation' ({sorted(names)}); choose one with "
        "dst_images=NAME (--dst-images NAME)"
    )


def _number(raw: dict[str, Any], key: str, path: Path) -> float:
    value = raw[key]
    try:
        number = float(np.asarray(value, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: '{key}' must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: '{key}' is not finite ({number})")
    return number


def read_threedst_annotation(path: str | os.PathLike[str]) -> dict[str, float]:
    """One 3D-DST annotation .npy -> {azimuth, elevation, theta (radians), distance} (distance NaN if absent).

    Raises:
        prf.body.pickle_io.ForbiddenPickleClass: the file names a class outside the allow-list.
        SMALFileError / ValueError: unreadable, not a dict, or ``theta`` / ``phi`` missing or not numbers.
    """
    path = Path(path)
    raw = load_pickle_restricted(path)
    missing = [k for k in ("theta", "phi") if k not in raw]
    if missing:
        raise ValueError(
            f"{path}: not a 3D-DST annotation: missing {missing} (found keys {sorted(map(str, raw))[:10]})"
        )
    distance_key = next((k for k in ("dist", "distance") if k in raw), None)
    return {
        "azimuth": _number(raw, "theta", path),
        "elevation": math.pi / 2.0 - _number(raw, "phi", path),
        "theta": _number(raw, "camera_rotation", path) if "camera_rotation" in raw else 0.0,
        "distance": _number(raw, distance_key, path) if distance_key else math.nan,
    }


def collect_threedst_items(
    root: str | os.PathLike[str], dst_images: str | None = None
) -> tuple[list[KCFItem], list[ItemError]]:
    """Labelled items of a 3D-DST output folder (sorted by image id) and the images that failed.

    Each generated image ``NNN_SS.png`` takes the label of ``annotation/NNN.npy``. An image whose
    annotation is missing, unreadable or refused becomes an ItemError naming the file.
    """
    root = Path(root)
    models = _model_dirs(root)
    if not models:
        raise ValueError(f"{root} is not in 3D-DST's layout (no <synset>/<model_id>/annotation folders)")
    folder = dst_images or detect_generated_folder(root)
    items: list[KCFItem] = []
    errors: list[ItemError] = []
    cache: dict[Path, dict[str, float] | str] = {}
    for synset, model in models:
        image_dir = model / folder
        if not image_dir.is_dir():
            continue
        for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            match = _SAMPLE_STEM.match(image_path.stem)
            render = match.group("render") if match else image_path.stem
            image_id = f"{synset}_{model.name}_{image_path.stem}"
            shown = image_path.relative_to(root).as_posix()
            annotation_path = model / ANNOTATION_DIR / f"{render}.npy"
            if annotation_path not in cache:
                try:
                    cache[annotation_path] = read_threedst_annotation(annotation_path)
                except (SMALFileError, ValueError) as err:
                    cache[annotation_path] = f"annotation: {err}"
            label = cache[annotation_path]
            if isinstance(label, str):
                errors.append(ItemError(image_id, shown, label, image_path))
                continue
            angles = (label["azimuth"], label["elevation"], label["theta"])
            items.append(KCFItem(image_id, shown, image_path, None, angles, "3d-dst"))
    if not items and not errors:
        raise ValueError(f"{root}: no images in any '<model_id>/{folder}/' folder")
    ids = [item.image_id for item in items] + [error.image_id for error in errors]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{root}: image ids are not unique (synset/model/file names collide)")
    items.sort(key=lambda item: item.image_id)
    return items, errors
