"""The built-in `render` backend: a CPU stand-in for diffusion that needs no weights.

It paints the rendered mesh with per-part procedural textures, random light and a random background
(procedural, or photos from a folder the user gives), deterministically per image seed. The picture
follows the render exactly, so a faithful image's annotation is right by construction; failures come only
from `generation.failures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from generation.backends.base import GenerationBackend, GenerationRequest, register_backend
from generation.textures import AppearanceStyle, synthesize_image
from prf.data.io import read_image_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_BACKGROUNDS = 256  # kept in memory; enough variety for a stand-in


def load_backgrounds(folder: str | Path) -> list[np.ndarray]:
    """Up to MAX_BACKGROUNDS RGB images (H,W,3) uint8 from a folder, in sorted order (deterministic)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"background_dir: not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_BACKGROUNDS]
    if not paths:
        raise ValueError(f"background_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [read_image_rgb(p) for p in paths]


@register_backend("render")
class RenderBackend(GenerationBackend):
    """Shades the renderer's output into an RGB image. Options: style ("synthetic" or "standin"),
    background_dir (a folder of background photos)."""

    name = "render"

    def __init__(self, style: str = "synthetic", background_dir: str | None = None) -> None:
        styles = {"synthetic": AppearanceStyle.synthetic, "standin": AppearanceStyle.realistic_standin}
        if style not in styles:
            raise ValueError(f"render backend: unknown style {style!r}; choose from {sorted(styles)}")
        self.style_name = style
        self.style = styles[style]()
        self.background_dir = background_dir
        self.backgrounds = load_backgrounds(background_dir) if background_dir else None

    @property
    def preferred_batch_size(self) -> int:
        return 1

    def generate(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        images = []
        for request in requests:
            if request.render is None:
                raise ValueError(f"{request.image_id}: the render backend needs the request's render result")
            rng = np.random.default_rng([request.seed, 2])
            images.append(synthesize_image(request.render, rng, self.style, backgrounds=self.backgrounds))
        return images

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "style": self.style_name, "background_dir": self.background_dir}
