"""The built-in quadruped: a procedural dog-like animal in SMAL's 35-joint layout, used without a SMAL file.

The mesh is a union of closed swept parts (torso, neck, skull, muzzle, two ears, four legs, four paws, tail),
each watertight on its own and overlapping its neighbours at the joints, so a posed animal shows no gaps and
ray casting sees one closed surface. Every joint sits on a ring of its part; the joint regressor is that
ring's mean. Skinning blends smoothly between the bones of each part's chain. The model has no pose
correctives (posedirs are zeros) and no SMAL shape families (family_means is None).

Frame and units: SMAL's (x forward, y to the animal's left, z up), metres. About a metre long; in the rest
pose the paws stand at z = -0.5, front paws near x = +0.45, back paws near x = -0.32, legs pointing down.

Shape betas (NB = 6, linear, meaningful over [-2, 2]), in order:
    0 leg_length   +20 % leg length per unit; paws stay on the ground, the body moves up.
    1 body_length  +15 % trunk length (hips to shoulders) per unit.
    2 girth        +12 % trunk and neck cross-section per unit (legs +6 %, set wider apart).
    3 neck_length  +25 % neck length per unit; the head moves along the neck.
    4 tail_length  +25 % tail length per unit (thickness unchanged).
    5 head_size    +10 % head (skull, muzzle, ears) per unit, about the head joint.

Legend: V vertices, F faces, J = 35 joints, NB = 6 betas, P = (J - 1) * 9.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from prf.body import layout
from prf.body.builtin_mesh import Part, left_parts, mid_parts, smooth_chain_weights
from prf.body.model_data import SMALModelData

NAME = "builtin-quadruped"


# Which part's knot ring regresses each joint (the torso's knot 1 is the pelvis, its knots 2..7 the spine).
_JOINT_RING: dict[str, tuple[str, int]] = {
    "pelvis": ("torso", 1),
    **{
        n: ("torso", i + 2)
        for i, n in enumerate(["pelvis0", "spine", "spine0", "spine1", "spine2", "spine3"])
    },
    **{
        f"{s}Leg{i}": (f"{side}_front_leg", i)
        for s, side in (("L", "left"), ("R", "right"))
        for i in (1, 2, 3)
    },
    "LFoot": ("left_front_leg", 4),
    "RFoot": ("right_front_leg", 4),
    **{
        f"{s}LegBack{i}": (f"{side}_back_leg", i)
        for s, side in (("L", "left"), ("R", "right"))
        for i in (1, 2, 3)
    },
    "LFootBack": ("left_back_leg", 4),
    "RFootBack": ("right_back_leg", 4),
    "Neck": ("neck", 1),
    "Head": ("neck", 2),
    **{f"Tail{i}": ("tail", i) for i in range(1, 8)},
    "Mouth": ("muzzle", 1),
    "LEar": ("left_ear", 1),
    "REar": ("right_ear", 1),
}


def _mirror_part(p: Part) -> Part:
    name = p.name.replace("left", "right")
    chain = [layout.mirror_joint_name(n) for n in p.chain]
    return Part(name, p.tube.mirrored(), layout.FINE_PART_FLIP[p.label], chain, list(p.knots), "right")


def build_parts() -> list[Part]:
    """All parts of the built-in mesh with their vertex offsets set (midline, then left, then right)."""
    left = left_parts()
    parts = mid_parts() + left + [_mirror_part(p) for p in left]
    offset = 0
    for p in parts:
        p.offset = offset
        offset += p.tube.verts.shape[0]
    return parts


def _mirror_map(parts: list[Part], num_verts: int) -> np.ndarray:
    """(V,) index of each vertex's mirror image under y -> -y."""
    mirror = np.empty(num_verts, dtype=np.int64)
    by_name = {p.name: p for p in parts}
    for p in parts:
        n = p.tube.verts.shape[0]
        if p.side == "mid":
            mirror[p.offset : p.offset + n] = p.offset + p.tube.self_mirror_map()
        else:
            other = by_name[p.name.replace(p.side, "right" if p.side == "left" else "left")]
            mirror[p.offset : p.offset + n] = other.offset + np.arange(n)
    return mirror


def _skinning(parts: list[Part], joint_index: dict[str, int], num_verts: int) -> np.ndarray:
    """(V, J) skinning weights: each part blends along its own bone chain (blend half-width <= 4 cm)."""
    weights = np.zeros((num_verts, len(joint_index)))
    for p in parts:
        rows = slice(p.offset, p.offset + p.tube.verts.shape[0])
        cols = [joint_index[n] for n in p.chain]
        if not p.knots:
            weights[rows, cols[0]] = 1.0
            continue
        bounds = p.tube.knot_arclen[p.knots]
        w = smooth_chain_weights(p.tube.arclen, bounds, np.full(bounds.shape, 0.04))
        weights[rows, cols] = w
    return weights


# Keypoint targets on the rest surface (left or midline ones; right ones are mirrored), with the parts
# whose vertices may form the group and the group size.
_KEYPOINT_TARGETS: dict[str, tuple[tuple[float, float, float], tuple[str, ...], int]] = {
    "left_eye": ((0.672, 0.047, 0.30), ("skull",), 3),
    "chin": ((0.69, 0.0, 0.19), ("muzzle",), 3),
    "left_front_paw": ((0.45, 0.095, -0.5), ("left_front_paw",), 4),
    "left_back_paw": ((-0.31, 0.095, -0.5), ("left_back_paw",), 4),
    "tail_base": ((-0.44, 0.0, 0.135), ("tail",), 3),
    "left_front_elbow": ((0.39, 0.13, -0.20), ("left_front_leg",), 3),
    "left_back_knee": ((-0.26, 0.131, -0.20), ("left_back_leg",), 3),
    "left_shoulder": ((0.40, 0.135, -0.02), ("left_front_leg",), 4),
    "left_front_wrist": ((0.42, 0.121, -0.38), ("left_front_leg",), 3),
    "left_back_hock": ((-0.34, 0.119, -0.36), ("left_back_leg",), 3),
    "neck": ((0.455, 0.0, 0.22), ("neck",), 3),
    "tail_end": ((-0.80, 0.0, -0.07), ("tail",), 5),
    "left_ear": ((0.585, 0.082, 0.425), ("left_ear",), 4),
    "left_mouth_corner": ((0.725, 0.03, 0.205), ("muzzle",), 3),
    "nose": ((0.80, 0.0, 0.215), ("muzzle",), 5),
    "tail_middle": ((-0.58, 0.0, 0.06), ("tail",), 3),
}


def _keypoint_groups(parts: list[Part], verts: np.ndarray, mirror: np.ndarray) -> list[list[int]]:
    """26 vertex groups in layout.KEYPOINT_NAMES order; right groups mirror left ones, midline ones are
    closed under the mirror map so their means lie on y = 0."""
    by_name = {p.name: p for p in parts}
    groups: dict[str, list[int]] = {}
    for kp, (target, part_names, k) in _KEYPOINT_TARGETS.items():
        cand = np.concatenate(
            [by_name[n].offset + np.arange(by_name[n].tube.verts.shape[0]) for n in part_names]
        )
        dist = np.linalg.norm(verts[cand] - np.asarray(target), axis=1)
        chosen = cand[np.argsort(dist, kind="stable")[:k]]
        if kp.startswith("left_"):
            groups[kp] = sorted(int(i) for i in chosen)
            groups["right_" + kp[5:]] = sorted(int(i) for i in mirror[chosen])
        else:
            groups[kp] = sorted({int(i) for i in chosen} | {int(i) for i in mirror[chosen]})
    return [groups[name] for name in layout.KEYPOINT_NAMES]


BETA_NAMES: tuple[str, ...] = (
    "leg_length",
    "body_length",
    "girth",
    "neck_length",
    "tail_length",
    "head_size",
)
# Relative change of each property per unit beta (see the module docstring).
_LEG_GAIN, _BODY_GAIN, _GIRTH_GAIN, _NECK_GAIN, _TAIL_GAIN, _HEAD_GAIN = 0.20, 0.15, 0.12, 0.25, 0.25, 0.10
_FRONT = ("front_leg", "front_paw", "neck", "skull", "muzzle", "ear")
_HEAD = ("skull", "muzzle", "ear")


def _shape_directions(parts: list[Part], joints: np.ndarray, joint_index: dict[str, int]) -> np.ndarray:
    """(V, 3, 6) linear shape directions: the displacement, metres, of one unit of each beta.

    Rings move rigidly with their centre for the length betas, so joints (ring means) follow the surface.
    """

    def jnt(name: str) -> np.ndarray:
        return joints[joint_index[name]]

    z_top = 0.5 * (jnt("LLeg1")[2] + jnt("LLegBack1")[2])
    z_foot = 0.5 * (jnt("LFoot")[2] + jnt("LFootBack")[2])
    x_sh, x_hip = jnt("LLeg1")[0], jnt("LLegBack1")[0]
    x_mid = 0.5 * (x_sh + x_hip)
    neck_vec = jnt("Head") - jnt("Neck")
    neck_len = float(np.linalg.norm(neck_vec))
    neck_axis = neck_vec / neck_len
    out = []
    for p in parts:
        kind = p.name.removeprefix(f"{p.side}_") if p.side != "mid" else p.name
        c, v = p.tube.centers, p.tube.verts
        d = np.zeros((v.shape[0], 3, 6))
        # 0 leg length: legs stretch between foot and shoulder/hip height; the body rides on top.
        if kind in ("front_leg", "back_leg"):
            d[:, 2, 0] = _LEG_GAIN * np.clip(c[:, 2] - z_foot, 0.0, z_top - z_foot)
        elif kind not in ("front_paw", "back_paw"):
            d[:, 2, 0] = _LEG_GAIN * (z_top - z_foot)
        # 1 body length: the trunk between hips and shoulders stretches; the rest moves with its end.
        if kind == "torso":
            d[:, 0, 1] = _BODY_GAIN * np.clip(c[:, 0] - x_mid, x_hip - x_mid, x_sh - x_mid)
        else:
            d[:, 0, 1] = _BODY_GAIN * ((x_sh if kind in _FRONT else x_hip) - x_mid)
        # 2 girth: fatter trunk and neck; legs a little thicker and set wider apart.
        if kind in ("torso", "neck"):
            d[:, :, 2] = _GIRTH_GAIN * (v - c)
        elif kind in ("front_leg", "back_leg", "front_paw", "back_paw", "tail"):
            d[:, :, 2] = 0.5 * _GIRTH_GAIN * (v - c) * (0.0 if kind.endswith("paw") else 1.0)
            if kind != "tail":
                top = "LLeg1" if kind.startswith("front") else "LLegBack1"
                d[:, 1, 2] += _GIRTH_GAIN * jnt(top)[1] * (1.0 if p.side == "left" else -1.0)
        # 3 neck length: the neck stretches along its axis, the head moves with its end.
        if kind == "neck":
            along = np.clip((c - jnt("Neck")) @ neck_axis, 0.0, neck_len)
            d[:, :, 3] = _NECK_GAIN * along[:, None] * neck_axis
        elif kind in _HEAD:
            d[:, :, 3] = _NECK_GAIN * neck_len * neck_axis
        # 4 tail length: the tail's centre line scales about Tail1 (thickness unchanged).
        if kind == "tail":
            beyond = p.tube.arclen > p.tube.knot_arclen[1]
            d[beyond, :, 4] = _TAIL_GAIN * (c[beyond] - jnt("Tail1"))
        # 5 head size: skull, muzzle and ears scale about the head joint.
        if kind in _HEAD:
            d[:, :, 5] = _HEAD_GAIN * (v - jnt("Head"))
        out.append(d)
    return np.concatenate(out)


@dataclass(frozen=True)
class _Built:
    v_template: np.ndarray
    faces: np.ndarray
    j_regressor: np.ndarray
    weights: np.ndarray
    shapedirs: np.ndarray
    part_labels: np.ndarray
    keypoint_groups: list[list[int]]
    mirror: np.ndarray
    rest_joints: np.ndarray
    part_of_vertex: np.ndarray


@functools.lru_cache(maxsize=1)
def _build() -> _Built:
    parts = build_parts()
    verts = np.concatenate([p.tube.verts for p in parts])
    faces = np.concatenate([p.tube.faces + p.offset for p in parts])
    num_verts = verts.shape[0]
    names = list(layout.JOINT_NAMES_35)
    joint_index = {n: i for i, n in enumerate(names)}
    by_name = {p.name: p for p in parts}

    j_regressor = np.zeros((len(names), num_verts))
    rest_joints = np.zeros((len(names), 3))
    for joint, (part_name, knot) in _JOINT_RING.items():
        p = by_name[part_name]
        ring = p.offset + p.tube.knot_rings[knot]
        j_regressor[joint_index[joint], ring] = 1.0 / ring.size
        rest_joints[joint_index[joint]] = p.tube.centers[p.tube.knot_rings[knot][0]]

    mirror = _mirror_map(parts, num_verts)
    labels = np.concatenate([np.full(p.tube.verts.shape[0], p.label, dtype=np.int64) for p in parts])
    part_of_vertex = np.concatenate(
        [np.full(p.tube.verts.shape[0], i, dtype=np.int64) for i, p in enumerate(parts)]
    )
    shapedirs = _shape_directions(parts, rest_joints, joint_index)
    return _Built(
        v_template=verts,
        faces=faces,
        j_regressor=j_regressor,
        weights=_skinning(parts, joint_index, num_verts),
        shapedirs=shapedirs,
        part_labels=labels,
        keypoint_groups=_keypoint_groups(parts, verts, mirror),
        mirror=mirror,
        rest_joints=rest_joints,
        part_of_vertex=part_of_vertex,
    )


def build_quadruped() -> SMALModelData:
    """The built-in quadruped as SMALModelData (deterministic; built once, then copied from a cache).

    Returns:
        SMALModelData with v_template (V, 3) metres, shapedirs (V, 3, 6), posedirs (V, 3, 306) zeros,
        j_regressor (35, V), weights (V, 35), parents (35,), faces (F, 3), the 35 SMAL joint names, 26
        keypoint groups, part_labels (V,), beta_names, family_means None, name "builtin-quadruped", and extra:
        "mirror_vertex" (V,) mirror image of each vertex under y -> -y, "rest_joints" (35, 3) the designed
        rest joint locations, "part_of_vertex" (V,) index of the closed part (each watertight) of each vertex.
    """
    b = _build()
    num_joints = len(layout.JOINT_NAMES_35)
    return SMALModelData(
        v_template=b.v_template.copy(),
        shapedirs=b.shapedirs.copy(),
        posedirs=np.zeros((b.v_template.shape[0], 3, (num_joints - 1) * 9)),
        j_regressor=b.j_regressor.copy(),
        weights=b.weights.copy(),
        parents=np.array(layout.PARENTS_35, dtype=np.int64),
        faces=b.faces.copy(),
        joint_names=list(layout.JOINT_NAMES_35),
        keypoint_groups=[list(g) for g in b.keypoint_groups],
        part_labels=b.part_labels.copy(),
        family_means=None,
        beta_names=list(BETA_NAMES),
        name=NAME,
        extra={
            "mirror_vertex": b.mirror.copy(),
            "rest_joints": b.rest_joints.copy(),
            "part_of_vertex": b.part_of_vertex.copy(),
        },
    )
