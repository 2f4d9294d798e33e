"""The ControlNet condition of a render: Canny edges, as 3D-DST makes them.

The render (RGB on a black background) is resized so that its short side is `short_side` pixels and both
sides are multiples of 64, then OpenCV's Canny (thresholds 100 and 200 by default) runs on the RGB image
(OpenCV takes the largest gradient over the channels) and the edge map is stacked to 3 channels.
Sizes are (W, H) = width, height in pixels; arrays are (H, W, 3) uint8.
"""

from __future__ import annotations

import cv2
import numpy as np

MULTIPLE = 64  # Stable Diffusion's latent grid (8) times the UNet's downsampling (8)


def condition_size(width: int, height: int, short_side: int = 512) -> tuple[int, int]:
    """(W', H') of the condition for a width x height render: the short side becomes `short_side` and the
    long side keeps the aspect ratio, rounded to the nearest multiple of 64 (at least 64)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"condition_size: width and height must be positive, got {width}x{height}")
    if short_side <= 0 or short_side % MULTIPLE:
        raise ValueError(
            f"condition_size: short_side must be a positive multiple of {MULTIPLE} px, got {short_side} "
            f"(3D-DST uses 512)"
        )
    long_side = max(width, height) * short_side / min(width, height)
    long_side = max(MULTIPLE, round(long_side / MULTIPLE) * MULTIPLE)
    return (short_side, long_side) if width <= height else (long_side, short_side)


def make_condition(rgb: np.ndarray, short_side: int = 512, low: int = 100, high: int = 200) -> np.ndarray:
    """(H', W', 3) uint8 Canny edges (0 or 255, the 3 channels equal) of an (H, W, 3) uint8 render.

    (W', H') = condition_size(W, H, short_side). Downscaling uses area averaging, upscaling bilinear
    interpolation. low, high: Canny hysteresis thresholds on the gradient magnitude.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"make_condition: rgb must be an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if not 0 <= low <= high:
        raise ValueError(f"make_condition: need 0 <= low <= high, got low={low}, high={high}")
    height, width = rgb.shape[:2]
    size = condition_size(width, height, short_side)
    if size != (width, height):
        shrink = size[0] * size[1] < width * height
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    edges = cv2.Canny(np.ascontiguousarray(rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)
