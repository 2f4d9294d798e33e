"""Procedural appearance of the render backend: determinism, contrast, left/right symmetry, styles."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import trimesh

from generation.render import Renderer, RenderResult
from generation.textures import AppearanceStyle, part_tints, synthesize_image
from prf.body.layout import FINE_PART_FLIP, FINE_PARTS, FINE_TO_COARSE

SIZE = 96
LEGS = {"left_front_leg": (0.3, 0.12), "right_front_leg": (0.3, -0.12),
        "left_back_leg": (-0.3, 0.12), "right_back_leg": (-0.3, -0.12)}  # fmt: skip


def toy_animal() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A left/right symmetric box quadruped in SMAL's frame (x forward, y left, z up, metres):
    vertices, faces, fine part label per face, and 26 keypoints (paws and muzzle placed, others 0)."""
    pieces = [("torso", (0.8, 0.3, 0.3), (0.0, 0.0, 0.1)), ("head", (0.2, 0.2, 0.2), (0.5, 0.0, 0.3)),
              ("tail", (0.3, 0.05, 0.05), (-0.55, 0.0, 0.2)),
              ("left_ear", (0.06, 0.06, 0.1), (0.5, 0.07, 0.45)),
              ("right_ear", (0.06, 0.06, 0.1), (0.5, -0.07, 0.45))]  # fmt: skip
    pieces += [(name, (0.08, 0.08, 0.45), (x, y, -0.27)) for name, (x, y) in LEGS.items()]
    verts, faces, labels = [], [], []
    for name, extents, centre in pieces:
        box = trimesh.creation.box(extents=extents)
        faces.append(np.asarray(box.faces) + sum(len(v) for v in verts))
        verts.append(np.asarray(box.vertices) + centre)
        labels.append(np.full(len(box.faces), FINE_PARTS.index(name), dtype=np.uint8))
    keypoints = np.zeros((26, 3))
    keypoints[3:7] = [(x, y, -0.49) for x, y in LEGS.values()]
    keypoints[22:25] = [(0.6, 0.05, 0.25), (0.6, -0.05, 0.25), (0.6, 0.0, 0.3)]
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(labels), keypoints


def look_at(eye: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV extrinsics (x right, y down, z forward) of a camera at eye looking at target, z up."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    return R, -R @ eye


def render_toy(
    eye: tuple[float, float, float],
    light: np.ndarray | None = None,
    target: tuple[float, float, float] = (0, 0, 0),
    size: int = SIZE,
) -> RenderResult:
    v, f, labels, keypoints = toy_animal()
    K = np.array([[1.1 * size, 0, (size - 1) / 2], [0, 1.1 * size, (size - 1) / 2], [0, 0, 1.0]])
    R, t = look_at(np.asarray(eye, float), np.asarray(target, float))
    return Renderer().render(
        v,
        f,
        labels,
        K,
        R,
        t,
        size,
        size,
        keypoints_3d=keypoints,
        light_dir=light,
        fine_to_coarse=FINE_TO_COARSE,
    )


@pytest.fixture(scope="module")
def side_view() -> RenderResult:
    return render_toy((0.8, 2.6, 0.8), light=np.array([0.3, 0.5, 1.0]))


def test_deterministic_per_seed_and_seeds_differ(side_view: RenderResult) -> None:
    for style in (AppearanceStyle.synthetic(), AppearanceStyle.realistic_standin()):
        a = synthesize_image(side_view, np.random.default_rng(3), style)
        b = synthesize_image(side_view, np.random.default_rng(3), style)
        c = synthesize_image(side_view, np.random.default_rng(4), style)
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_animal_stands_out_from_the_background(side_view: RenderResult) -> None:
    sil = side_view.silhouette.astype(np.uint8)
    border = cv2.dilate(sil, np.ones((3, 3), np.uint8)) - cv2.erode(sil, np.ones((3, 3), np.uint8))
    found = []
    for seed in range(8):
        image = synthesize_image(side_view, np.random.default_rng(seed), AppearanceStyle.synthetic())
        edges = cv2.Canny(image, 50, 100) > 0
        found.append(edges[border > 0].mean())  # share of the outline's pixels on an image edge
        inside = image[side_view.silhouette].astype(float)
        assert inside.std(axis=0).max() > 3  # shaded and textured, not a flat fill
    assert np.median(found) > 0.3


def test_left_and_right_share_colours(side_view: RenderResult) -> None:
    for seed in range(5):
        tints = part_tints(np.random.default_rng(seed), 0.3)
        np.testing.assert_array_equal(tints, tints[list(FINE_PART_FLIP)])
        assert np.ptp(tints[1:]) > 0  # the part groups do differ

    # a symmetric animal seen from the front under a headlight, position-dependent patterns off:
    # the left and right legs must come out the same colour
    front = render_toy((2.2, 0.0, 0.1), size=160)
    plain = dataclasses.replace(
        AppearanceStyle.synthetic(), part_variation=0.4, mottle_strength=0.0, fur_strength=0.0,
        stripe_prob=0.0, spot_prob=0.0, paw_dark_prob=1.0, muzzle_light_prob=1.0, belly_light_prob=1.0,
        noise_std=(0.0, 0.0), jpeg_prob=0.0, blur_prob=0.0,
    )  # fmt: skip
    core = cv2.erode(front.silhouette.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    for seed in range(4):
        image = synthesize_image(front, np.random.default_rng(seed), plain).astype(float)
        for left, right in (("left_front_leg", "right_front_leg"), ("left_ear", "right_ear")):
            lm = core & (front.part_fine == FINE_PARTS.index(left))
            rm = core & (front.part_fine == FINE_PARTS.index(right))
            assert lm.sum() >= 8 and rm.sum() >= 8, f"the front view must show both {left} and {right}"
            np.testing.assert_allclose(image[lm].mean(axis=0), image[rm].mean(axis=0), atol=2.0)


def _stats(render: RenderResult, style: AppearanceStyle) -> tuple[float, float]:
    """Mean |Laplacian| of the grey image (grain, texture) and mean saturation of the animal, 8 seeds."""
    grain, saturation = [], []
    for seed in range(8):
        image = synthesize_image(render, np.random.default_rng(seed), style)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        grain.append(np.abs(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F)).mean())
        saturation.append(cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1][render.silhouette].mean())
    return float(np.mean(grain)), float(np.mean(saturation))


def test_realistic_standin_differs_from_synthetic(side_view: RenderResult) -> None:
    grain_syn, sat_syn = _stats(side_view, AppearanceStyle.synthetic())
    grain_real, sat_real = _stats(side_view, AppearanceStyle.realistic_standin())
    assert grain_real > 1.5 * grain_syn  # textured backgrounds and sensor noise
    assert sat_real < 0.8 * sat_syn  # muted palette


def test_photo_backgrounds_are_used(side_view: RenderResult) -> None:
    photo = np.zeros((50, 70, 3), dtype=np.uint8)
    photo[:] = (20, 160, 60)
    style = dataclasses.replace(AppearanceStyle.synthetic(), photo_background_prob=1.0)
    image = synthesize_image(side_view, np.random.default_rng(0), style, backgrounds=[photo])
    far = cv2.dilate(side_view.silhouette.astype(np.uint8), np.ones((25, 25), np.uint8)) == 0
    np.testing.assert_allclose(image[far].mean(axis=0), (20, 160, 60), atol=4.0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        synthesize_image(side_view, np.random.default_rng(0), style, backgrounds=[photo[..., 0]])


def test_empty_render_gives_a_background_only_image() -> None:
    empty = render_toy((3.0, 0.0, 0.0), target=(6.0, 0.0, 0.0))  # looking away: the toy is behind
    assert not empty.silhouette.any()
    image = synthesize_image(empty, np.random.default_rng(0), AppearanceStyle.synthetic())
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0


def test_style_validation() -> None:
    with pytest.raises(ValueError, match="stripe_prob"):
        dataclasses.replace(AppearanceStyle.synthetic(), stripe_prob=1.5)
    with pytest.raises(ValueError, match="coat_palette"):
        dataclasses.replace(AppearanceStyle.synthetic(), coat_palette=())
    with pytest.raises(ValueError, match="jpeg_quality"):
        dataclasses.replace(AppearanceStyle.realistic_standin(), jpeg_quality=(80, 20))
