"""One view over every input kind PRF and KCF read: a BATCH folder, an Animal3D-format JSON, or a folder of
images with one annotation JSON beside each image. References are cheap (nothing decoded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prf.data.animal3d import (
    SampleRef,
    image_folder_pairs,
    iter_animal3d_samples,
    iter_image_folder_samples,
    load_animal3d_entries,
)
from prf.data.annotation import AnnotationError
from prf.data.batch import MANIFEST_FILE, METADATA_FILE, PATH_COLUMNS, BatchReader


def detect_input(path: str | os.PathLike[str]) -> str:
    """Kind of an input path: "batch" (a folder with batch.json or manifest.parquet), "animal3d_json" (an
    Animal3D-format JSON file) or "image_folder" (a folder of images, each with ``<stem>.json`` beside it).

    Raises FileNotFoundError for a missing path and ValueError (saying what was found) otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_dir():
        if (path / METADATA_FILE).is_file() or (path / MANIFEST_FILE).is_file():
            return "batch"
        pairs = image_folder_pairs(path)
        if any(annotation.is_file() for _, annotation in pairs):
            return "image_folder"
        raise ValueError(
            f"{path} is not a recognised input: no {METADATA_FILE} / {MANIFEST_FILE} (a BATCH), and "
            f"{len(pairs)} images but none with an annotation JSON beside it (foo.png + foo.json)"
        )
    if path.suffix.lower() != ".json":
        raise ValueError(
            f"{path} is not a recognised input: expected a BATCH folder, an image folder or a .json file"
        )
    try:
        load_animal3d_entries(path)
    except AnnotationError as err:
        raise ValueError(
            f"{path} is not an Animal3D JSON file ({err}); a single image's annotation "
            "belongs beside its image: pass that folder"
        ) from err
    return "animal3d_json"


_MANIFEST_CHUNK = 4096
_NOT_EXTRA = frozenset(("image_id", *PATH_COLUMNS))  # manifest columns a SampleRef holds elsewhere


def iter_batch_samples(root: str | os.PathLike[str]) -> Iterator[SampleRef]:
    """One SampleRef per manifest row; ``extra`` holds the row's non-path columns (injected_failure, ...)."""
    reader = BatchReader(root)
    manifest = reader.manifest
    for start in range(0, len(manifest), _MANIFEST_CHUNK):
        # chunked: converting a million-row manifest to dicts at once costs seconds and memory, and a
        # ``--limit`` run stops after its first chunk
        yield from _batch_refs(reader, _records(manifest.iloc[start : start + _MANIFEST_CHUNK]), start)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """``frame.to_dict("records")``, the same values, 4-6x faster: one ``tolist`` per column instead of
    boxing cell by cell (12 against 50 ms for 4096 rows of a BATCH manifest)."""
    columns = list(frame.columns)
    cells = zip(*(_column_values(frame[column]) for column in columns), strict=True)  # one tuple per row
    return [dict(zip(columns, row, strict=True)) for row in cells]


def _column_values(column: pd.Series) -> list[Any]:
    """A column's values as Python objects; pandas' NA of nullable dtypes becomes None, as in to_dict."""
    values = column.tolist()
    if getattr(column.dtype, "na_value", None) is pd.NA:
        return [None if value is pd.NA else value for value in values]
    return values


def _batch_refs(reader: BatchReader, rows: list[dict], start: int) -> Iterator[SampleRef]:
    for index, row in enumerate(rows, start):
        image_id = row["image_id"]
        extra = {
            k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items() if k not in _NOT_EXTRA
        }
        yield SampleRef(
            image_id,
            reader.resolve(image_id, row["image"]),  # from the row: a lookup per image is slow at scale
            reader.resolve(image_id, row["annotation"]),
            None,
            index,
            "batch",
            reader.root,
            extra,
        )


def iter_samples(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> Iterator[SampleRef]:
    """SampleRefs over a BATCH, an Animal3D JSON (image paths relative to its folder, or to ``image_root``)
    or an annotated image folder; cheap (no image decoding, annotations validated on ``load_annotation``)."""
    kind = detect_input(path)
    if kind == "batch":
        return iter_batch_samples(path)
    if kind == "animal3d_json":
        return iter_animal3d_samples(path, image_root)
    return iter_image_folder_samples(path)
