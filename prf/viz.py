"""Drawing helpers shared by contact sheets, body previews and reports (numpy + OpenCV, RGB uint8).

Legend: H, W image size in pixels; keypoints are (26, 2) or (26, 3) [x, y, visibility] in pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import cv2
import numpy as np

from prf.body.layout import FINE_PARTS, KEYPOINT_LIMBS

# One colour per fine part (index 0 = background is black); left parts warm, right parts cool.
PART_COLOURS = np.array(
    [
        (0, 0, 0),
        (230, 190, 60),  # head
        (200, 120, 200),  # neck
        (120, 120, 120),  # torso
        (230, 80, 60),  # left front leg
        (60, 120, 230),  # right front leg
        (240, 150, 40),  # left back leg
        (40, 190, 200),  # right back leg
        (120, 200, 80),  # tail
        (250, 110, 150),  # left ear
        (110, 90, 240),  # right ear
    ],
    dtype=np.uint8,
)
assert len(PART_COLOURS) == len(FINE_PARTS)

LIMB_COLOURS = {
    "left_front_leg": (230, 80, 60),
    "right_front_leg": (60, 120, 230),
    "left_back_leg": (240, 150, 40),
    "right_back_leg": (40, 190, 200),
    "head": (230, 190, 60),
    "tail": (120, 200, 80),
}


def colour_parts(mask: np.ndarray) -> np.ndarray:
    """(H, W) fine part labels -> (H, W, 3) uint8 colours."""
    return PART_COLOURS[np.clip(mask, 0, len(PART_COLOURS) - 1)]


def overlay_parts(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend part colours over an RGB image where the mask is foreground."""
    out = image.astype(np.float32).copy()
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colour_parts(mask)[fg].astype(np.float32)
    return out.astype(np.uint8)


def _pixel(point: np.ndarray) -> tuple[int, int]:
    return (round(float(point[0])), round(float(point[1])))


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    colour: tuple[int, int, int] | None = None,
    radius: int = 2,
    skeleton: bool = True,
) -> np.ndarray:
    """Draw keypoints (visible ones filled, occluded ones hollow) and the limb chains on a copy of image.

    `colour=None` colours each limb by its side (left warm, right cool); a fixed colour is used to tell
    two keypoint sets apart (e.g. annotation vs prediction).
    """
    out = np.ascontiguousarray(image.copy())
    kp = np.asarray(keypoints, dtype=np.float64)
    vis = kp[:, 2] > 0 if kp.shape[1] > 2 else np.ones(len(kp), dtype=bool)
    finite = np.isfinite(kp[:, :2]).all(axis=1)
    if skeleton:
        for name, chain in KEYPOINT_LIMBS.items():
            c = colour or LIMB_COLOURS[name]
            for a, b in itertools.pairwise(chain):
                if finite[a] and finite[b]:
                    cv2.line(out, _pixel(kp[a]), _pixel(kp[b]), c, 1, cv2.LINE_AA)
    for i in np.flatnonzero(finite):
        c = colour or (255, 255, 255)
        cv2.circle(out, _pixel(kp[i]), radius, c, -1 if vis[i] else 1, cv2.LINE_AA)
    return out


def label(image: np.ndarray, text: str) -> np.ndarray:
    """Write a small caption in the top-left corner (white on a dark box)."""
    out = np.ascontiguousarray(image.copy())
    scale = max(0.3, out.shape[1] / 700.0)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (w + 4, h + base + 4), (0, 0, 0), -1)
    cv2.putText(out, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to a size x size tile, keeping the aspect ratio (black padding)."""
    h, w = image.shape[:2]
    s = size / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((size, size, 3), dtype=np.uint8)
    rh, rw = resized.shape[:2]
    y0, x0 = (size - rh) // 2, (size - rw) // 2
    tile[y0 : y0 + rh, x0 : x0 + rw] = resized if resized.ndim == 3 else resized[..., None]
    return tile


def grid(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """Arrange equally sized (t, t, 3) tiles row by row."""
    if not tiles:
        raise ValueError("no tiles to arrange")
    t = tiles[0].shape[0]
    rows = (len(tiles) + columns - 1) // columns
    sheet = np.zeros((rows * t, columns * t, 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * t : (r + 1) * t, c * t : (c + 1) * t] = tile
    return sheet
