"""Procedural appearance for the built-in `render` backend: a weight-free stand-in for diffusion.

`synthesize_image` paints a `RenderResult` into an (H, W, 3) uint8 RGB picture: a coat colour per animal
with smooth per-part variation, surface-attached mottling, optional stripes / spots, darker paws, lighter
muzzle and belly, streaky fur noise, the render's Lambert shading, a random background (procedural or a
photo), then optional blur, sensor noise and JPEG compression. Every random number comes from the `rng`
argument, so an image is a pure function of (render, seed, style).

Left/right parts always share their colour (real animals do not tell left from right by colour), and part
colour changes are blurred across part borders so the picture does not spell out the part labels.

Colours are float RGB in [0, 1] inside this module. Patterns live on the surface: they are functions of the
world hit points (metres, divided by the object size), not of pixel positions, so they follow the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from generation.render import RenderResult
from prf.body.layout import FINE_PARTS

Colour = tuple[float, float, float]
Range = tuple[float, float]
BACKGROUND_KINDS = ("gradient", "noise", "blobs", "ground_sky")
PAW_KEYPOINTS = (3, 4, 5, 6)  # Animal3D's 26-keypoint layout: the four paws
MUZZLE_KEYPOINTS = (22, 23, 24)  # mouth corners and nose


@dataclass(frozen=True)
class AppearanceStyle:
    """Explicit knobs of the procedural appearance; build one with `synthetic()` or `realistic_standin()`.

    Probabilities (`*_prob`) are per image; ranges are (low, high), drawn uniformly per image; strengths
    are relative amplitudes (0 = off). Colours are RGB in [0, 1].
    coat_palette: base coat colours, one drawn per animal; coat_jitter: its relative change (mostly
    brightness). part_variation: brightness difference between part groups (head, neck, torso, legs,
    tail; blurred across borders). mottle_strength: large surface patches. fur_strength / fur_length:
    streak noise and its length (fraction of the image's short side). saturation: colour saturation
    factor. shading_gamma: exponent on the render's shading (> 1 is harsher), exposure: brightness gain,
    light_tint: warm/cool light colour spread. background_weights: weights of BACKGROUND_KINDS;
    background_saturation; background_detail: fine texture amplitude; photo_background_prob: chance of
    a user photo when some are given. shadow_prob: a soft contact shadow under the animal. edge_feather:
    sigma (pixels) of the inward softening of the silhouette edge. blur_sigma (pixels), noise_std (of
    the 0..1 intensity), jpeg_quality (1..100): the final degradations.
    """

    name: str
    coat_palette: tuple[Colour, ...]
    coat_jitter: float
    part_variation: float
    mottle_strength: float
    fur_strength: float
    fur_length: float
    stripe_prob: float
    spot_prob: float
    paw_dark_prob: float
    muzzle_light_prob: float
    belly_light_prob: float
    saturation: Range
    shading_gamma: Range
    exposure: Range
    light_tint: float
    background_weights: tuple[float, float, float, float]
    background_saturation: Range
    background_detail: float
    photo_background_prob: float
    shadow_prob: float
    edge_feather: float
    blur_prob: float
    blur_sigma: Range
    noise_std: Range
    jpeg_prob: float
    jpeg_quality: tuple[int, int]

    def __post_init__(self) -> None:
        if not self.coat_palette:
            raise ValueError(f"AppearanceStyle {self.name!r}: coat_palette must not be empty")
        for field in ("stripe_prob", "spot_prob", "paw_dark_prob", "muzzle_light_prob", "belly_light_prob",
                      "photo_background_prob", "shadow_prob", "blur_prob", "jpeg_prob"):  # fmt: skip
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"AppearanceStyle {self.name!r}: {field} must be a probability in [0, 1]")
        for field in ("saturation", "shading_gamma", "exposure", "background_saturation", "blur_sigma",
                      "noise_std"):  # fmt: skip
            low, high = getattr(self, field)
            if not 0.0 <= low <= high:
                raise ValueError(f"AppearanceStyle {self.name!r}: {field} must satisfy 0 <= low <= high")
        if len(self.background_weights) != len(BACKGROUND_KINDS) or sum(self.background_weights) <= 0:
            raise ValueError(f"AppearanceStyle {self.name!r}: background_weights needs 4 weights, sum > 0")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(
                f"AppearanceStyle {self.name!r}: jpeg_quality must satisfy 1 <= low <= high <= 100"
            )

    @classmethod
    def synthetic(cls) -> AppearanceStyle:
        """The default: natural coat colours, clean smooth backgrounds, soft light, little degradation."""
        return cls(
            name="synthetic",
            coat_palette=((0.78, 0.60, 0.40), (0.50, 0.33, 0.18), (0.28, 0.19, 0.12), (0.58, 0.57, 0.55),
                          (0.14, 0.12, 0.11), (0.90, 0.84, 0.70), (0.86, 0.52, 0.22), (0.93, 0.92, 0.90)),
            coat_jitter=0.05, part_variation=0.08, mottle_strength=0.12, fur_strength=0.07, fur_length=0.03,
            stripe_prob=0.15, spot_prob=0.15, paw_dark_prob=0.3, muzzle_light_prob=0.3, belly_light_prob=0.4,
            saturation=(0.9, 1.2), shading_gamma=(0.8, 1.1), exposure=(1.0, 1.2), light_tint=0.04,
            background_weights=(0.3, 0.2, 0.3, 0.2), background_saturation=(0.15, 0.5),
            background_detail=0.03, photo_background_prob=0.5, shadow_prob=0.6, edge_feather=0.6,
            blur_prob=0.1, blur_sigma=(0.4, 0.8), noise_std=(0.0, 0.01), jpeg_prob=0.0, jpeg_quality=(90, 95),
        )  # fmt: skip

    @classmethod
    def realistic_standin(cls) -> AppearanceStyle:
        """A visibly different "stand-in real" look: muted earthy / slate palette, textured photo-like
        backgrounds, harsh contrasty light, more sensor noise, blur and JPEG artefacts."""
        return cls(
            name="realistic_standin",
            coat_palette=((0.52, 0.50, 0.42), (0.42, 0.44, 0.48), (0.68, 0.62, 0.54), (0.30, 0.28, 0.28),
                          (0.60, 0.42, 0.30), (0.76, 0.70, 0.58), (0.48, 0.37, 0.30)),
            coat_jitter=0.07, part_variation=0.12, mottle_strength=0.25, fur_strength=0.15, fur_length=0.05,
            stripe_prob=0.1, spot_prob=0.25, paw_dark_prob=0.5, muzzle_light_prob=0.4, belly_light_prob=0.5,
            saturation=(0.45, 0.8), shading_gamma=(1.2, 1.8), exposure=(1.1, 1.45), light_tint=0.10,
            background_weights=(0.05, 0.45, 0.15, 0.35), background_saturation=(0.1, 0.35),
            background_detail=0.14, photo_background_prob=0.9, shadow_prob=0.8, edge_feather=0.9,
            blur_prob=0.5, blur_sigma=(0.5, 1.2), noise_std=(0.02, 0.05),
            jpeg_prob=0.8, jpeg_quality=(35, 75),
        )  # fmt: skip


def part_tints(rng: np.random.Generator, variation: float) -> np.ndarray:
    """(P,) brightness factor per fine part (P = len(FINE_PARTS)); mirror parts share theirs.

    Head and ears share one factor and the four legs another (so left and right never differ).
    """
    groups = {"head": 0, "left_ear": 0, "right_ear": 0, "neck": 1, "torso": 2, "tail": 3}
    factors = 1.0 + variation * rng.uniform(-1.0, 1.0, size=5)
    tints = np.ones(len(FINE_PARTS))
    for index, name in enumerate(FINE_PARTS):
        if name != "background":
            tints[index] = factors[groups.get(name, 4)]
    return tints


def synthesize_image(
    render: RenderResult,
    rng: np.random.Generator,
    style: AppearanceStyle,
    backgrounds: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB picture of `render` (H, W its size) in `style`; backgrounds: optional photos
    (any size, (h, w, 3) uint8 RGB) to draw backgrounds from. Deterministic given the rng state."""
    height, width = render.silhouette.shape
    image = _background(rng, style, height, width, backgrounds)
    sil = render.silhouette
    if sil.any():
        if rng.random() < style.shadow_prob:
            image *= 1.0 - _contact_shadow(rng, sil)[..., None]
        box = _box(sil, margin=int(3 * style.edge_feather) + 1)
        rows, cols = np.nonzero(sil[box])
        colour = _animal_colours(render, box, rows, cols, rng, style)
        alpha = np.ones((rows.size, 1), dtype=np.float32)
        if style.edge_feather > 0:  # soften the outermost pixels, inwards only (the mask stays exact)
            soft = cv2.GaussianBlur(sil[box].astype(np.float32), (0, 0), style.edge_feather)
            alpha = np.clip(2.0 * soft[rows, cols] - 0.5, 0.0, 1.0)[:, None]
        view = image[box]
        view[rows, cols] = alpha * colour + (1.0 - alpha) * view[rows, cols]
    return _degrade(np.clip(image, 0.0, 1.0), rng, style)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Row and column slices of the mask's bounding box grown by `margin` pixels (clipped to the image)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, c0 = max(0, rows[0] - margin), max(0, cols[0] - margin)
    return slice(r0, rows[-1] + margin + 1), slice(c0, cols[-1] + margin + 1)


# -- the animal ------------------------------------------------------------------------------------------
def _animal_colours(
    render: RenderResult,
    box: tuple[slice, slice],
    rows: np.ndarray,
    cols: np.ndarray,
    rng: np.random.Generator,
    style: AppearanceStyle,
) -> np.ndarray:
    """(M, 3) float32 shaded colours of the silhouette pixels (rows, cols) of the crop `box`."""
    side = min(render.silhouette.shape)
    size = render.object_size if render.object_size > 0 else 1.0
    surface = render.hit_points[box][rows, cols] / np.float32(size)  # (M, 3) in object sizes
    points = surface + rng.uniform(0, 50, size=3).astype(np.float32)  # a random place on the noise lattice
    base = np.asarray(style.coat_palette[int(rng.integers(len(style.coat_palette)))])
    jitter = style.coat_jitter * (3.0 * rng.standard_normal() + 0.5 * rng.standard_normal(3))  # brightness
    base = np.clip(base * (1.0 + jitter), 0.03, 0.97).astype(np.float32)
    dark = base * np.float32(rng.uniform(0.2, 0.45))
    light = base + (1.0 - base) * np.float32(rng.uniform(0.4, 0.7))
    noise = _Noise3(rng)

    sil = render.silhouette[box]
    tint_map = np.zeros(sil.shape, dtype=np.float32)
    tint_map[rows, cols] = part_tints(rng, style.part_variation)[render.part_fine[box][rows, cols]]
    tint = _masked_smooth(tint_map, sil, 0.03 * side)[rows, cols]
    mottle = 1.0 + style.mottle_strength * (2.0 * noise(points * rng.uniform(3, 6)) - 1.0)
    albedo = base[None, :] * (tint * mottle)[:, None]

    if rng.random() < style.stripe_prob:
        axis = np.array([1.0, 0.0, rng.uniform(-0.4, 0.4)], dtype=np.float32)
        phase = points @ axis * rng.uniform(7, 13) + 1.2 * noise(points * 3.0)
        albedo = _mix(albedo, dark, _smoothstep(0.6, 0.8, 0.5 + 0.5 * np.sin(2 * np.pi * phase)))
    if rng.random() < style.spot_prob:
        albedo = _mix(albedo, dark, 0.85 * _smoothstep(0.66, 0.74, noise(points * rng.uniform(9, 16))))
    keypoints = render.keypoints_3d / np.float32(size)
    has_keypoints = keypoints.shape[0] > max(*PAW_KEYPOINTS, *MUZZLE_KEYPOINTS)
    if has_keypoints and rng.random() < style.paw_dark_prob:
        near = _nearest_distance(surface, keypoints[list(PAW_KEYPOINTS)])
        albedo = _mix(albedo, dark, 0.8 * (1.0 - _smoothstep(0.05, 0.1, near)))
    if has_keypoints and rng.random() < style.muzzle_light_prob:
        near = _nearest_distance(surface, keypoints[list(MUZZLE_KEYPOINTS)])
        albedo = _mix(albedo, light, 0.7 * (1.0 - _smoothstep(0.03, 0.07, near)))
    if rng.random() < style.belly_light_prob:
        below = -render.normals_world[box][rows, cols, 2]
        albedo = _mix(albedo, light, 0.7 * _smoothstep(0.2, 0.7, below))

    fur = _fur(rng, sil.shape[0], sil.shape[1], style.fur_length * side)[rows, cols]
    albedo *= (1.0 + style.fur_strength * fur)[:, None]
    grey = (albedo @ np.full(3, 1.0 / 3.0, dtype=np.float32))[:, None]
    albedo = grey + np.float32(rng.uniform(*style.saturation)) * (albedo - grey)

    shade = render.shading[box][rows, cols] ** np.float32(rng.uniform(*style.shading_gamma))
    warmth = style.light_tint * rng.standard_normal()  # warm (> 0) or cool (< 0) light
    light_colour = np.array([1.0 + warmth, 1.0, 1.0 - warmth]) * rng.uniform(*style.exposure)
    return np.clip(albedo * shade[:, None] * light_colour.astype(np.float32), 0.0, 1.0)


class _Noise3:
    """Smooth 3D value noise in [0, 1] on an integer lattice, with random lattice values from the rng."""

    def __init__(self, rng: np.random.Generator) -> None:
        perm = rng.permutation(256)
        self.perm = np.concatenate([perm, perm])
        self.values = rng.random(256, dtype=np.float32)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """(M,) noise at points (M, 3) (lattice units)."""
        cell = np.floor(points)
        frac = points - cell
        w = frac * frac * (3.0 - 2.0 * frac)
        i = cell.astype(np.int64) & 255
        out = np.zeros(points.shape[0], dtype=np.float32)
        for dx in (0, 1):
            px = self.perm[(i[:, 0] + dx) & 255]
            wx = w[:, 0] if dx else 1.0 - w[:, 0]
            for dy in (0, 1):
                py = self.perm[px + ((i[:, 1] + dy) & 255)]
                wy = wx * (w[:, 1] if dy else 1.0 - w[:, 1])
                for dz in (0, 1):
                    corner = self.values[self.perm[py + ((i[:, 2] + dz) & 255)]]
                    out += corner * wy * (w[:, 2] if dz else 1.0 - w[:, 2])
        return out


def _fur(rng: np.random.Generator, height: int, width: int, length: float) -> np.ndarray:
    """(h, w) zero-mean, unit-std streaky noise: white noise smeared along one random direction over
    `length` pixels."""
    noise = _uniform_noise(rng, (height, width), 1.0)
    size = max(3, round(float(length)) | 1)
    kernel = np.zeros((size, size), dtype=np.float32)
    angle, half = rng.uniform(0, np.pi), (size - 1) / 2.0
    end = (round(half + half * float(np.cos(angle))), round(half + half * float(np.sin(angle))))
    start = (size - 1 - end[0], size - 1 - end[1])
    cv2.line(kernel, start, end, 1.0, 1)
    streaks = cv2.filter2D(noise, -1, kernel / kernel.sum())
    return streaks / max(float(streaks.std()), 1e-6)


def _masked_smooth(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) Gaussian blur of values over the mask only (normalised by the blurred mask)."""
    m = mask.astype(np.float32)
    both = _smooth(np.dstack([values * m, m]), sigma)
    return both[..., 0] / np.maximum(both[..., 1], 1e-6)


def _nearest_distance(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(M,) distance from each of points (M, 3) to the nearest of targets (T, 3)."""
    best = np.full(points.shape[0], np.inf, dtype=points.dtype)
    for target in targets:
        diff = points - target
        np.minimum(best, np.einsum("ij,ij->i", diff, diff), out=best)
    return np.sqrt(best)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    s = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _mix(colours: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(M, 3) colours moved towards target (3,) by weight (M,) in [0, 1]."""
    return colours + weight[:, None] * (target[None, :] - colours)


# -- backgrounds, shadow, degradation ---------------------------------------------------------------------
def _random_colour(rng: np.random.Generator, saturation: Range, value: Range = (0.25, 0.95)) -> np.ndarray:
    """(3,) float32 RGB: a mostly natural hue (foliage, sky, earth; sometimes any) with the given
    saturation and value ranges."""
    hue_ranges = ((30.0, 80.0), (90.0, 120.0), (5.0, 30.0), (0.0, 180.0))  # OpenCV hue units (0..180)
    low, high = hue_ranges[int(rng.choice(4, p=(0.35, 0.25, 0.25, 0.15)))]
    hsv = np.array(
        [[[min(179.0, rng.uniform(low, high)), 255 * rng.uniform(*saturation), 255 * rng.uniform(*value)]]]
    )
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _fractal(rng: np.random.Generator, height: int, width: int, cells: int, octaves: int) -> np.ndarray:
    """(H, W) float32 value noise in [0, 1]: `octaves` layers, the first with `cells` cells on the long
    side, each next one twice as fine and half as strong (1/f, like natural textures)."""
    out = np.zeros((height, width), dtype=np.float32)
    total = 0.0
    for octave in range(octaves):
        n = cells * 2**octave
        shape = (
            max(2, round(n * height / max(height, width))) + 1,
            max(2, round(n * width / max(height, width))) + 1,
        )
        grid = rng.random(shape, dtype=np.float32)
        out += np.float32(0.5**octave) * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += 0.5**octave
    return np.clip(out / np.float32(total), 0.0, 1.0)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large sigma (pixels), computed at a reduced resolution (the result is smooth)."""
    height, width = image.shape[:2]
    factor = max(1, int(sigma // 2))
    if factor == 1:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    small = cv2.resize(
        image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def _background(
    rng: np.random.Generator,
    style: AppearanceStyle,
    height: int,
    width: int,
    photos: Sequence[np.ndarray] | None,
) -> np.ndarray:
    """(H, W, 3) float32 background: a photo crop or one of BACKGROUND_KINDS, plus fine texture."""
    if photos and rng.random() < style.photo_background_prob:
        return _photo_crop(rng, photos[int(rng.integers(len(photos)))], height, width)
    weights = np.asarray(style.background_weights, dtype=np.float64)
    kind = BACKGROUND_KINDS[int(rng.choice(len(weights), p=weights / weights.sum()))]
    c0, c1 = (_random_colour(rng, style.background_saturation) for _ in range(2))
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # (H, 1) image fractions
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]  # (1, W)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
        level = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    elif kind == "noise":
        level = _fractal(rng, height, width, int(rng.integers(2, 6)), 4)
    elif kind == "blobs":
        return _blobs(rng, style, height, width, c0) * (
            1.0 + style.background_detail * _detail(rng, height, width)
        )
    else:
        horizon = rng.uniform(0.25, 0.65) + (xx - 0.5) * np.float32(rng.uniform(-0.15, 0.15))
        ground = 0.6 + 0.4 * _fractal(rng, height, width, 8, 3) * (0.5 + yy)
        level = np.where(yy > horizon, ground, 0.6 * np.clip(horizon - yy, 0.0, 1.0))
    image = c0[None, None, :] + level[..., None] * (c1 - c0)[None, None, :]
    return image * (1.0 + style.background_detail * _detail(rng, height, width))


def _detail(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 1) float32 fine texture in [-1, 1] (photo-like grain and clutter)."""
    return (2.0 * _fractal(rng, height, width, max(4, max(height, width) // 12), 3) - 1.0)[..., None]


def _blobs(
    rng: np.random.Generator, style: AppearanceStyle, height: int, width: int, base: np.ndarray
) -> np.ndarray:
    """(H, W, 3) float32: soft out-of-focus discs of random colours over a base colour."""
    small_h, small_w = max(8, height // 8), max(8, width // 8)
    canvas = np.empty((small_h, small_w, 3), dtype=np.float32)
    canvas[:] = base
    for _ in range(int(rng.integers(3, 9))):
        centre = (int(rng.integers(small_w)), int(rng.integers(small_h)))
        radius = int(rng.integers(2, max(3, min(small_h, small_w) // 3)))
        cv2.circle(canvas, centre, radius, _random_colour(rng, style.background_saturation).tolist(), -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.08 * max(small_h, small_w))
    return cv2.resize(canvas, (width, height), interpolation=cv2.INTER_CUBIC)


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32: a random crop (same aspect as the output) of an RGB photo, maybe mirrored."""
    photo = np.asarray(photo)
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"background photos must be (h, w, 3) uint8 RGB, got {photo.shape} {photo.dtype}")
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.5, 1.0) * min(ph / height, pw / width)
    ch, cw = max(1, int(height * scale)), max(1, int(width * scale))
    y0, x0 = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    crop = photo[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    shrink = ch * cw > height * width
    method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=method)
    return out.astype(np.float32) / 255.0


def _contact_shadow(rng: np.random.Generator, silhouette: np.ndarray) -> np.ndarray:
    """(H, W) float32 shadow strength in [0, 1): the silhouette squashed, shifted down and blurred."""
    height, width = silhouette.shape
    rows = np.flatnonzero(silhouette.any(axis=1))
    bottom, extent = rows[-1], rows[-1] - rows[0] + 1
    squash = rng.uniform(0.15, 0.35)
    matrix = np.float32([[1, 0, rng.uniform(-0.1, 0.1) * extent], [0, squash, (1 - squash) * bottom]])
    shadow = cv2.warpAffine(silhouette.astype(np.float32), matrix, (width, height))
    shadow = _smooth(shadow, max(1.0, 0.04 * extent))
    return (rng.uniform(0.2, 0.45) * shadow).astype(np.float32)


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Zero-mean float32 noise of the given std (uniform: several times cheaper than Gaussian draws)."""
    noise = rng.random(shape, dtype=np.float32) - np.float32(0.5)
    noise *= np.float32(std * np.sqrt(12.0))
    return noise


def _degrade(image: np.ndarray, rng: np.random.Generator, style: AppearanceStyle) -> np.ndarray:
    """(H, W, 3) uint8 from float RGB in [0, 1]: optional blur, sensor noise and JPEG round trip."""
    if rng.random() < style.blur_prob:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*style.blur_sigma))
    std = rng.uniform(*style.noise_std)
    if std > 0:
        height, width = image.shape[:2]
        luma = _uniform_noise(rng, (height, width), std)
        chroma = _uniform_noise(rng, (max(1, height // 4), max(1, width // 4), 3), 0.5 * std)
        chroma = cv2.resize(chroma, (width, height), interpolation=cv2.INTER_LINEAR)
        chroma += luma[..., None]
        image = cv2.add(np.ascontiguousarray(image, dtype=np.float32), chroma)
    out = cv2.convertScaleAbs(np.clip(image, 0.0, 1.0), alpha=255.0)  # rounds and saturates to uint8
    if rng.random() < style.jpeg_prob:
        quality = int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed in the appearance degradation step")
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    return out
