"""`prf body`: render a body model so a user can see what they loaded (parts, keypoints, poses).

The sheet shows the rest pose from the side, front and above-front-left, then sampled poses, each as a
part-coloured shaded render with the 26 keypoints drawn (filled = visible, hollow = occluded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from generation.pipeline import face_labels_from_vertices
from generation.render import Renderer
from prf.body import SMAL
from prf.body.layout import FINE_TO_COARSE
from prf.body.poses import PoseSampler, PoseSamplerConfig
from prf.data.io import write_png
from prf.geometry import intrinsics, look_at
from prf.viz import colour_parts, draw_keypoints, grid, label

VIEWS = (("side (left)", 90.0, 10.0), ("front", 0.0, 10.0), ("front-left, above", 45.0, 35.0))


def render_body_sheet(
    out: str | Path,
    smal: str | Path | None = None,
    family_data: str | Path | None = None,
    family: int | None = None,
    size: int = 384,
    seed: int = 0,
    num_poses: int = 3,
) -> Path:
    """Render the rest pose from three views and `num_poses` sampled poses; write one PNG; return its path."""
    model = SMAL.builtin() if smal is None else SMAL.from_file(smal, family_data=family_data, family=family)
    sampler = PoseSampler(PoseSamplerConfig.default(), model.joint_names)
    poses = np.zeros((1 + num_poses, model.num_joints, 3))
    poses[1:] = sampler.sample(num_poses, seed=seed)
    with torch.no_grad():
        posed = model(pose=torch.as_tensor(poses, dtype=torch.float32))
    faces = model.faces.numpy()
    face_parts = face_labels_from_vertices(faces, model.part_labels.numpy())
    renderer = Renderer()
    K = intrinsics(1.4 * size, size, size).double().numpy()
    has_keypoints = posed.has_keypoints
    shots = [(name, 0, az, el) for name, az, el in VIEWS]
    shots += [(f"sampled pose {k}", k, 60.0, 15.0) for k in range(1, 1 + num_poses)]
    tiles = []
    for name, k, az, el in shots:
        vertices = posed.vertices[k].double().numpy()
        centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2.0
        extent = float(np.linalg.norm(vertices.max(axis=0) - vertices.min(axis=0)))
        R, t = look_at(np.deg2rad(az), np.deg2rad(el), 0.0, 1.6 * extent, target=torch.as_tensor(centre))
        keypoints = posed.keypoints[k].double().numpy() if has_keypoints else None
        result = renderer.render(
            vertices, faces, face_parts, K, R[0].numpy(), t[0].numpy(), size, size,
            keypoints_3d=keypoints, light_dir=np.array([0.4, 0.6, 1.0]), fine_to_coarse=FINE_TO_COARSE,
        )  # fmt: skip
        shade = (0.35 + 0.65 * result.shading)[..., None]
        image = (colour_parts(result.part_fine).astype(np.float32) * shade).astype(np.uint8)
        image[~result.silhouette] = 255
        if has_keypoints:
            image = draw_keypoints(image, result.keypoints_2d, radius=max(2, size // 120))
        tiles.append(label(image, f"{model.name}: {name}"))
    return write_png(Path(out), grid(tiles, columns=3))
