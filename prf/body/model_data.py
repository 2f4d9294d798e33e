"""SMALModelData: the arrays that define a SMAL-family body model, independent of where they came from.

Both the pickle loader (a real SMAL file) and the built-in quadruped produce one of these; the SMAL layer
(`prf.body.SMAL`) is built from it. Legend: V vertices, F faces, J joints, NB shape betas, P = (J-1)*9.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SMALModelData:
    """Arrays of a SMAL-family model, in the SMAL file's own layout (float64 / int64 numpy).

    Attributes:
        v_template: (V, 3) rest-pose vertices, metres, SMAL frame (x forward, y left, z up).
        shapedirs: (V, 3, NB) linear shape blend shapes.
        posedirs: (V, 3, P) pose-corrective blend shapes, P = (J-1)*9 (the file layout).
        j_regressor: (J, V) dense joint regressor.
        weights: (V, J) skinning weights, rows sum to 1.
        parents: (J,) parent index of each joint, parents[0] == -1.
        faces: (F, 3) triangle vertex indices.
        joint_names: J names (see prf.body.layout).
        keypoint_groups: 26 vertex-index groups (Animal3D keypoint = mean of its group), or None if unknown.
        part_labels: (V,) fine part index per vertex (prf.body.layout.FINE_PARTS, never 0), or None to
            derive it from the skinning weights.
        family_means: (K, NB') per-shape-family mean betas (SMAL cluster_means), or None.
        beta_names: optional names of the betas (the built-in model's betas have meanings).
        name: a short human-readable name of the model (e.g. "builtin-quadruped" or the file name).
    """

    v_template: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    j_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    faces: np.ndarray
    joint_names: list[str]
    keypoint_groups: list[list[int]] | None = None
    part_labels: np.ndarray | None = None
    family_means: np.ndarray | None = None
    beta_names: list[str] | None = None
    name: str = "smal"
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_joints(self) -> int:
        return int(self.parents.shape[0])

    @property
    def num_betas(self) -> int:
        return int(self.shapedirs.shape[2])
