"""Geometry of the built-in quadruped: closed generalized cylinders swept along paths, and the designed parts.

A part is a tube of elliptical rings swept along a smooth path through given knots, closed at both ends by
domes that end in a pole vertex, so every part is a watertight triangle mesh on its own. Every knot is a
station (a ring), so a joint placed on a knot is exactly the mean of that ring's vertices.

Legend: S stations, N vertices per ring, K knots, n vertices of a part, m faces of a part. Units: metres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prf.body import layout


@dataclass
class Tube:
    """One closed swept part.

    Attributes:
        verts: (n, 3) vertex positions, n = S * N + 2 (rings station by station, then the two poles).
        faces: (m, 3) triangles, outward-facing (counter-clockwise seen from outside).
        centers: (n, 3) the path point of each vertex's station (a pole is its own centre).
        arclen: (n,) arc length along the path of each vertex's station, metres from the first knot
            (negative on the start dome, beyond the last knot on the end dome).
        knot_arclen: (K,) arc length of each knot.
        knot_rings: K index arrays of shape (N,): the vertices of the ring at each knot.
        ring_size: N.
    """

    verts: np.ndarray
    faces: np.ndarray
    centers: np.ndarray
    arclen: np.ndarray
    knot_arclen: np.ndarray
    knot_rings: list[np.ndarray]
    ring_size: int

    def mirrored(self) -> Tube:
        """The mirror image under y -> -y (faces re-wound so they still face outward)."""
        flip = np.array([1.0, -1.0, 1.0])
        return Tube(
            verts=self.verts * flip,
            faces=self.faces[:, ::-1].copy(),
            centers=self.centers * flip,
            arclen=self.arclen.copy(),
            knot_arclen=self.knot_arclen.copy(),
            knot_rings=[r.copy() for r in self.knot_rings],
            ring_size=self.ring_size,
        )

    def self_mirror_map(self) -> np.ndarray:
        """(n,) mirror vertex of each vertex of a tube swept in the y = 0 plane with side axis +y."""
        n_st = (self.verts.shape[0] - 2) // self.ring_size
        k = np.arange(self.ring_size)
        ring_map = (self.ring_size - k) % self.ring_size
        rings = (np.arange(n_st)[:, None] * self.ring_size + ring_map[None, :]).reshape(-1)
        n_ring_verts = n_st * self.ring_size
        return np.concatenate([rings, [n_ring_verts, n_ring_verts + 1]]).astype(np.int64)


def _catmull_rom(p: np.ndarray, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Uniform Catmull-Rom through the rows of p (K, D); segment i gets counts[i] steps.

    Returns (points (S, D), knot_station (K,) index of each knot's station). Knots are hit exactly.
    """
    ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]], axis=0)
    out = []
    knot_station = [0]
    for i, c in enumerate(counts):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        t = (np.arange(c) / c)[:, None]
        seg = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        seg[0] = p1
        out.append(seg)
        knot_station.append(knot_station[-1] + c)
    out.append(p[-1:])
    return np.concatenate(out, axis=0), np.array(knot_station, dtype=np.int64)


def sweep(
    knots: np.ndarray,
    radii: np.ndarray,
    *,
    ring_size: int,
    step: float,
    cap_start: float,
    cap_end: float,
    cap_rings: int = 4,
    side_hint: tuple[float, float, float] = (0.0, 1.0, 0.0),
) -> Tube:
    """Sweep an elliptical ring along a smooth path through the knots and close both ends with domes.

    Args:
        knots: (K, 3) path knots, metres, K >= 2.
        radii: (K, 2) ring half-axes at each knot: (along the side axis, along the up axis), metres.
        ring_size: N vertices per ring (even, so that a ring in the y = 0 plane is left/right symmetric).
        step: target spacing between stations along the path, metres.
        cap_start: dome length before the first knot, metres (0 < cap).
        cap_end: dome length after the last knot, metres.
        cap_rings: rings on each dome between the end ring and the pole.
        side_hint: direction the rings' first axis should follow; made perpendicular to the path.

    Returns:
        The closed Tube. Ring vertex k sits at angle 2 pi k / N from the up axis towards the side axis.
    """
    knots = np.asarray(knots, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    if knots.ndim != 2 or knots.shape[1] != 3 or knots.shape[0] < 2 or radii.shape != (knots.shape[0], 2):
        raise ValueError(
            f"sweep needs knots (K, 3) and radii (K, 2), K >= 2; got {knots.shape}, {radii.shape}"
        )
    if ring_size < 4 or ring_size % 2:
        raise ValueError(f"ring_size must be an even number >= 4, got {ring_size}")
    seg_len = np.linalg.norm(np.diff(knots, axis=0), axis=1)
    counts = [max(2, round(float(length) / step)) for length in seg_len]
    data, knot_station = _catmull_rom(np.concatenate([knots, radii], axis=1), counts)
    path, rad = data[:, :3], np.maximum(data[:, 3:], 1e-4)

    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    hint = np.asarray(side_hint, dtype=np.float64)
    side = hint[None, :] - (tangent @ hint)[:, None] * tangent
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    up = np.cross(tangent, side)

    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    # Domes: ellipsoidal caps, ring j at angle phi_j from the end ring towards the pole.
    phi = 0.5 * np.pi * np.arange(1, cap_rings + 1) / (cap_rings + 1)
    start = [
        (path[0] - tangent[0] * cap_start * np.sin(a), rad[0] * np.cos(a), -cap_start * np.sin(a))
        for a in phi
    ]
    end = [
        (path[-1] + tangent[-1] * cap_end * np.sin(a), rad[-1] * np.cos(a), s[-1] + cap_end * np.sin(a))
        for a in phi
    ]
    st_c = np.concatenate([[c for c, _, _ in start[::-1]], path, [c for c, _, _ in end]])
    st_r = np.concatenate([[r for _, r, _ in start[::-1]], rad, [r for _, r, _ in end]])
    st_s = np.concatenate([[a for _, _, a in start[::-1]], s, [a for _, _, a in end]])
    st_side = np.concatenate([np.repeat(side[:1], cap_rings, 0), side, np.repeat(side[-1:], cap_rings, 0)])
    st_up = np.concatenate([np.repeat(up[:1], cap_rings, 0), up, np.repeat(up[-1:], cap_rings, 0)])

    theta = 2 * np.pi * np.arange(ring_size) / ring_size
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    sin_t[0], sin_t[ring_size // 2] = 0.0, 0.0
    rings = (
        st_c[:, None, :]
        + (st_r[:, 0, None] * sin_t[None, :])[..., None] * st_side[:, None, :]
        + (st_r[:, 1, None] * cos_t[None, :])[..., None] * st_up[:, None, :]
    )
    n_st = st_c.shape[0]
    pole_a = path[0] - tangent[0] * cap_start
    pole_b = path[-1] + tangent[-1] * cap_end
    verts = np.concatenate([rings.reshape(-1, 3), pole_a[None], pole_b[None]])

    idx = np.arange(n_st * ring_size).reshape(n_st, ring_size)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    # Quads on the side half (k < N/2) split along b-c, the others along a-d: mirror-symmetric triangles.
    half = (np.arange(ring_size) < ring_size // 2)[None, :, None]
    tri1 = np.where(half, np.stack([a, c, b], -1), np.stack([a, c, d], -1)).reshape(-1, 3)
    tri2 = np.where(half, np.stack([b, c, d], -1), np.stack([a, d, b], -1)).reshape(-1, 3)
    quads = np.concatenate([tri1, tri2])
    ia, ib = n_st * ring_size, n_st * ring_size + 1
    first, last = idx[0], idx[-1]
    fan_a = np.stack([np.full(ring_size, ia), first, np.roll(first, -1)], -1)
    fan_b = np.stack([np.full(ring_size, ib), np.roll(last, -1), last], -1)
    faces = np.concatenate([quads, fan_a, fan_b]).astype(np.int64)

    centers = np.concatenate([np.repeat(st_c, ring_size, 0), pole_a[None], pole_b[None]])
    arclen = np.concatenate([np.repeat(st_s, ring_size), [-cap_start, s[-1] + cap_end]])
    knot_rings = [idx[cap_rings + k] for k in knot_station]
    return Tube(verts, faces, centers, arclen, s[knot_station], knot_rings, ring_size)


def smooth_chain_weights(s: np.ndarray, boundaries: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Partition-of-unity weights over a chain of bones, blended smoothly at each joint.

    Bone i covers boundaries[i-1] <= s < boundaries[i] (bone 0 is open below, the last bone open above);
    around each boundary the weight passes from one bone to the next with a smoothstep of half-width widths.

    Args:
        s: (n,) arc length of each vertex, metres.
        boundaries: (B,) increasing arc lengths of the joints between consecutive bones.
        widths: (B,) blend half-widths, metres (> 0); shrunk where needed so neighbouring blends never
            overlap (which keeps every weight non-negative).

    Returns:
        (n, B + 1) non-negative weights whose rows sum to 1.
    """
    boundaries = np.asarray(boundaries, dtype=np.float64)
    if boundaries.size > 1 and np.any(np.diff(boundaries) <= 0):
        raise ValueError(f"chain boundaries must increase strictly, got {boundaries}")
    gaps = np.diff(boundaries)
    room = np.minimum(np.append(gaps, np.inf), np.insert(gaps, 0, np.inf))
    widths = np.minimum(np.asarray(widths, dtype=np.float64), 0.45 * room)  # windows never overlap
    t = np.clip((s[:, None] - boundaries[None, :] + widths[None, :]) / (2 * widths[None, :]), 0.0, 1.0)
    step = t * t * (3 - 2 * t)  # (n, B): 0 before the joint, 1 after
    upper = np.concatenate([np.ones((s.shape[0], 1)), step], axis=1)
    lower = np.concatenate([step, np.zeros((s.shape[0], 1))], axis=1)
    return upper - lower


# ---- the designed parts of the built-in quadruped (left and midline; right parts are mirrored) ----


@dataclass
class Part:
    """One closed part of the built-in mesh.

    Attributes:
        name: part name, e.g. "left_front_leg" or "left_front_paw".
        tube: its geometry.
        label: fine part index (layout.FINE_PARTS).
        chain: joint names of its bone chain, root first; chain[i] (i >= 1) starts at knot knots[i - 1].
        knots: knot index of each chain joint after the first.
        side: "mid" (symmetric about y = 0), "left" or "right".
        offset: index of its first vertex in the whole mesh (set when the mesh is assembled).
    """

    name: str
    tube: Tube
    label: int
    chain: list[str]
    knots: list[int] = field(default_factory=list)
    side: str = "mid"
    offset: int = 0


def _fp(name: str) -> int:
    return layout.FINE_PARTS.index(name)


def _tail_knots() -> np.ndarray:
    """(9, 3): a knot inside the rump, Tail1..Tail7 along a downward arc, and the tip end knot."""
    pts = [np.array([-0.36, 0.0, 0.08]), np.array([-0.43, 0.0, 0.10])]
    for deg, length in zip((5, -5, -15, -25, -35, -45, -50), (0.06,) * 6 + (0.05,), strict=True):
        a = np.deg2rad(deg)
        pts.append(pts[-1] + length * np.array([-np.cos(a), 0.0, np.sin(a)]))  # backwards, deg above level
    return np.stack(pts)


def _neck_knots() -> np.ndarray:
    """(4, 3): base inside the chest, Neck, Head, end inside the skull, on one straight line."""
    neck, head = np.array([0.45, 0.0, 0.09]), np.array([0.58, 0.0, 0.24])
    axis = (head - neck) / np.linalg.norm(head - neck)
    return np.stack([neck - 0.12 * axis, neck, head, head + 0.04 * axis])


def left_parts() -> list[Part]:
    """The left legs, paws and ear (the right ones are their mirror images)."""
    front = sweep(
        np.array([[0.39, 0.085, 0.05], [0.40, 0.09, -0.02], [0.39, 0.095, -0.20], [0.42, 0.095, -0.38],
                  [0.43, 0.095, -0.455], [0.435, 0.095, -0.47]]),
        np.array([[0.05, 0.065], [0.05, 0.062], [0.038, 0.045], [0.029, 0.033], [0.028, 0.032],
                  [0.027, 0.03]]),
        ring_size=16, step=0.03, cap_start=0.03, cap_end=0.015, cap_rings=3,
    )  # fmt: skip
    back = sweep(
        np.array([[-0.30, 0.08, 0.05], [-0.30, 0.085, -0.01], [-0.26, 0.095, -0.20], [-0.34, 0.095, -0.36],
                  [-0.335, 0.095, -0.455], [-0.33, 0.095, -0.47]]),
        np.array([[0.055, 0.08], [0.055, 0.078], [0.04, 0.05], [0.027, 0.032], [0.027, 0.03],
                  [0.026, 0.029]]),
        ring_size=16, step=0.03, cap_start=0.03, cap_end=0.015, cap_rings=3,
    )  # fmt: skip
    front_paw = sweep(
        np.array([[0.42, 0.095, -0.476], [0.46, 0.095, -0.476]]),
        np.array([[0.035, 0.024], [0.035, 0.024]]),
        ring_size=16, step=0.02, cap_start=0.028, cap_end=0.03, cap_rings=3,
    )  # fmt: skip
    back_paw = sweep(
        np.array([[-0.34, 0.095, -0.476], [-0.30, 0.095, -0.476]]),
        np.array([[0.033, 0.024], [0.033, 0.024]]),
        ring_size=16, step=0.02, cap_start=0.025, cap_end=0.03, cap_rings=3,
    )  # fmt: skip
    ear = sweep(
        np.array([[0.605, 0.04, 0.30], [0.60, 0.05, 0.33], [0.592, 0.066, 0.375], [0.585, 0.078, 0.41]]),
        np.array([[0.03, 0.012], [0.03, 0.01], [0.02, 0.007], [0.008, 0.004]]),
        ring_size=8, step=0.02, cap_start=0.01, cap_end=0.02, cap_rings=2,
    )  # fmt: skip
    legs = ["LLeg1", "LLeg2", "LLeg3", "LFoot"]
    back_legs = ["LLegBack1", "LLegBack2", "LLegBack3", "LFootBack"]
    return [
        Part("left_front_leg", front, _fp("left_front_leg"), ["spine3", *legs], [1, 2, 3, 4], "left"),
        Part("left_front_paw", front_paw, _fp("left_front_leg"), ["LFoot"], [], "left"),
        Part("left_back_leg", back, _fp("left_back_leg"), ["pelvis", *back_legs], [1, 2, 3, 4], "left"),
        Part("left_back_paw", back_paw, _fp("left_back_leg"), ["LFootBack"], [], "left"),
        Part("left_ear", ear, _fp("left_ear"), ["Head", "LEar"], [1], "left"),
    ]


def mid_parts() -> list[Part]:
    """The parts that straddle the midline: torso, neck, skull, muzzle, tail."""
    # Torso knots: rump end, pelvis, pelvis0, spine, spine0, spine1, spine2, spine3, chest end. The back line
    # stays level near z = +0.16 while the belly tucks up towards the hips.
    tx = np.array([-0.38, -0.30, -0.19, -0.08, 0.03, 0.14, 0.25, 0.36, 0.46])
    tr = np.array([[0.115, 0.12], [0.13, 0.135], [0.13, 0.13], [0.12, 0.12], [0.125, 0.13], [0.135, 0.145],
                   [0.14, 0.155], [0.135, 0.155], [0.115, 0.14]])  # fmt: skip
    tz = 0.16 - tr[:, 1]
    torso = sweep(
        np.stack([tx, np.zeros_like(tx), tz], 1), tr, ring_size=32, step=0.03, cap_start=0.08, cap_end=0.07
    )
    neck = sweep(
        _neck_knots(), np.array([[0.095, 0.11], [0.085, 0.095], [0.06, 0.065], [0.055, 0.06]]),
        ring_size=24, step=0.03, cap_start=0.03, cap_end=0.03,
    )  # fmt: skip
    skull = sweep(
        np.array([[0.55, 0.0, 0.28], [0.62, 0.0, 0.275], [0.67, 0.0, 0.265]]),
        np.array([[0.068, 0.072], [0.076, 0.078], [0.062, 0.066]]),
        ring_size=24, step=0.025, cap_start=0.05, cap_end=0.035,
    )  # fmt: skip
    muzzle = sweep(
        np.array([[0.62, 0.0, 0.245], [0.70, 0.0, 0.228], [0.78, 0.0, 0.218]]),
        np.array([[0.055, 0.055], [0.042, 0.04], [0.03, 0.028]]),
        ring_size=20, step=0.02, cap_start=0.03, cap_end=0.022,
    )  # fmt: skip
    tail_r = np.array([[0.03, 0.032], [0.03, 0.03], [0.026, 0.026], [0.023, 0.023], [0.021, 0.021],
                       [0.018, 0.018], [0.016, 0.016], [0.013, 0.013], [0.009, 0.009]])  # fmt: skip
    tail = sweep(_tail_knots(), tail_r, ring_size=12, step=0.03, cap_start=0.02, cap_end=0.015, cap_rings=3)
    spine = ["pelvis", "pelvis0", "spine", "spine0", "spine1", "spine2", "spine3"]
    tail_chain = ["pelvis"] + [f"Tail{i}" for i in range(1, 8)]
    return [
        Part("torso", torso, _fp("torso"), spine, [2, 3, 4, 5, 6, 7]),
        Part("neck", neck, _fp("neck"), ["spine3", "Neck", "Head"], [1, 2]),
        Part("skull", skull, _fp("head"), ["Head"], []),
        Part("muzzle", muzzle, _fp("head"), ["Head", "Mouth"], [1]),
        Part("tail", tail, _fp("tail"), tail_chain, list(range(1, 8))),
    ]
