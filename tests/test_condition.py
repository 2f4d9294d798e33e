"""Canny conditions: 3D-DST sizes (short side, multiples of 64) and edges where the render has them."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from generation.condition import condition_size, make_condition
from generation.render import Renderer


@pytest.mark.parametrize(
    ("width", "height", "short_side", "expected"),
    [
        (256, 256, 512, (512, 512)),
        (640, 480, 512, (704, 512)),  # 682.7 rounds to 11 x 64
        (480, 640, 512, (512, 704)),
        (100, 300, 64, (64, 192)),
        (1000, 990, 128, (128, 128)),
    ],
)
def test_condition_size(width: int, height: int, short_side: int, expected: tuple[int, int]) -> None:
    size = condition_size(width, height, short_side)
    assert size == expected
    assert size[0] % 64 == 0 and size[1] % 64 == 0 and min(size) == short_side


def test_condition_size_rejects_bad_sides() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        condition_size(256, 256, 500)
    with pytest.raises(ValueError, match="positive"):
        condition_size(0, 256, 512)


def rendered_square(size: int = 128) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB render (size x size, black background) of a unit square facing the camera, and the square's
    pixel extent (low, high) on both axes."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 0.01))
    focal = size * 0.8
    K = np.array([[focal, 0.0, (size - 1) / 2], [0.0, focal, (size - 1) / 2], [0.0, 0.0, 1.0]])
    labels = np.ones(len(box.faces), dtype=np.uint8)
    out = Renderer().render(box.vertices, box.faces, labels, K, np.eye(3), np.array([0, 0, 2.0]), size, size)
    half = focal * 0.5 / (2.0 - 0.005)
    grey = (out.shading * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), ((size - 1) / 2 - half, (size - 1) / 2 + half)


def test_make_condition_finds_the_square_edges() -> None:
    rgb, (lo, hi) = rendered_square(128)
    cond = make_condition(rgb, short_side=256)
    assert cond.shape == (256, 256, 3) and cond.dtype == np.uint8
    assert (cond[..., 0] == cond[..., 1]).all() and (cond[..., 1] == cond[..., 2]).all()
    assert set(np.unique(cond)) <= {0, 255}

    edges = cond[..., 0] > 0
    scale = 256 / 128
    rows, cols = np.nonzero(edges)
    # in the 2x upscaled condition, the square's border runs from about 2 * lo to 2 * hi on both axes
    dist_to_border = np.minimum(
        np.minimum(np.abs(rows - scale * lo), np.abs(rows - scale * hi)),
        np.minimum(np.abs(cols - scale * lo), np.abs(cols - scale * hi)),
    )
    assert edges.sum() > 3 * scale * (hi - lo)  # most of the 4 sides are found
    assert (dist_to_border <= 3).all()  # and nothing else


def test_make_condition_on_black_and_non_square_input() -> None:
    black = np.zeros((200, 300, 3), dtype=np.uint8)
    cond = make_condition(black, short_side=128)
    assert cond.shape == (128, 192, 3) and not cond.any()
    with pytest.raises(ValueError, match="uint8"):
        make_condition(black.astype(np.float32))
    with pytest.raises(ValueError, match="low <= high"):
        make_condition(black, low=200, high=100)
