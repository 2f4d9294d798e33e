"""`prf batch sheet`: a contact sheet of a BATCH so a person can look at it.

One row per image: the image with its annotated keypoints, the Canny condition, the part mask over the
image, and the image alone; the caption gives the id, category and injected failure (if any).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prf.data.batch import BatchReader
from prf.data.io import write_png
from prf.viz import draw_keypoints, fit, grid, label, overlay_parts

TILE = 192


def write_contact_sheet(batch: str | Path, out: str | Path, limit: int = 16) -> Path:
    """Write a PNG contact sheet of the first `limit` images of a BATCH; returns its path."""
    reader = BatchReader(batch)
    ids = reader.image_ids()[: max(1, limit)]
    if not ids:
        raise ValueError(f"{batch}: the batch has no finished images")
    tiles: list[np.ndarray] = []
    for image_id in ids:
        image = reader.read_image(image_id)
        annotation = reader.read_annotation(image_id)
        record = reader.record(image_id)
        caption = f"{image_id} {record.get('category', '')}"
        failure = record.get("injected_failure", "none")
        if failure != "none":
            caption += f" [{failure}]"
        keypoints = draw_keypoints(
            image, annotation.keypoints_2d_array(), radius=max(1, image.shape[0] // 128)
        )
        tiles.append(label(fit(keypoints, TILE), caption))
        tiles.append(label(fit(reader.read_condition(image_id), TILE), "condition"))
        tiles.append(label(fit(overlay_parts(image, reader.read_mask(image_id)), TILE), "parts"))
        tiles.append(fit(image, TILE))
    return write_png(Path(out), grid(tiles, columns=4))
