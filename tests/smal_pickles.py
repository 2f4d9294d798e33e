"""Test helper: builds small random SMAL-format models and writes them the way real SMAL files are written.

The real files are Python-2 pickles (protocol 0 or 2) that name ``numpy.core.multiarray._reconstruct``,
``copy_reg._reconstructor``, ``__builtin__.object``, ``chumpy.ch.Ch`` and ``scipy.sparse.csc.csc_matrix``,
and store raw array bytes as Python-2 ``str`` (opcodes STRING / BINSTRING). `Py2StylePickler` reproduces
exactly that with Python 3's pure-Python pickler: bytes and ASCII text are written as Python-2 strings, and
every global is written under its Python-2-era name (anything else is refused, so a test pickle can never
name something a real SMAL file would not).
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy._core.multiarray as np_multiarray
import scipy.sparse

from prf.body import layout
from prf.body.model_data import SMALModelData

ROOT_PARENT = 4294967295  # the root's parent id in real kintree_tables


class FakeCh:
    """Pickles as ``chumpy.ch.Ch`` with a state dict like chumpy's (the array under 'x')."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x)

    def __getstate__(self) -> dict[str, Any]:
        return {"x": self.x, "_dirty_vars": {"x"}, "_itr": None, "_make_dense": False, "_make_sparse": False}


class FakeChExpression:
    """Pickles as ``chumpy.ch_ops.add``: a chumpy expression node with no stored array."""

    def __init__(self, a: FakeCh, b: FakeCh) -> None:
        self.a, self.b = a, b

    def __getstate__(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "_dirty_vars": set()}


class OldCscMatrix:
    """Pickles as ``scipy.sparse.csc.csc_matrix`` with an old scipy's attribute dict ('shape', 'format')."""

    def __init__(self, dense: np.ndarray) -> None:
        m = scipy.sparse.csc_matrix(dense)
        self.state = {"shape": m.shape, "format": "csc", "maxprint": 50}
        self.state.update(data=m.data, indices=m.indices, indptr=m.indptr)

    def __getstate__(self) -> dict[str, Any]:
        return self.state


_PY2_NAMES: dict[Any, tuple[str, str]] = {
    np_multiarray._reconstruct: ("numpy.core.multiarray", "_reconstruct"),
    np.ndarray: ("numpy", "ndarray"),
    np.dtype: ("numpy", "dtype"),
    copyreg._reconstructor: ("copy_reg", "_reconstructor"),
    object: ("__builtin__", "object"),
    set: ("__builtin__", "set"),
    FakeCh: ("chumpy.ch", "Ch"),
    FakeChExpression: ("chumpy.ch_ops", "add"),
    OldCscMatrix: ("scipy.sparse.csc", "csc_matrix"),
    scipy.sparse.csc_matrix: ("scipy.sparse.csc", "csc_matrix"),
}


class Py2StylePickler(pickle._Pickler):
    """Pure-Python pickler writing Python-2 strings and Python-2 global names (protocols 0 and 2 only)."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, raw: bytes) -> None:
        if self.proto == 0:
            self.write(pickle.STRING + repr(raw)[1:].encode("ascii") + b"\n")
        elif len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    def save_bytes(self, obj: bytes) -> None:
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        if not obj.isascii():
            raise pickle.PicklingError(f"non-ASCII text {obj!r} in a Python-2-style test pickle")
        self._save_py2_str(obj.encode("ascii"))
        self.memoize(obj)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj not in _PY2_NAMES:
            raise pickle.PicklingError(f"{obj!r} has no Python-2 SMAL-file name in the test helper")
        module, qualname = _PY2_NAMES[obj]
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_dumps(obj: Any, protocol: int) -> bytes:
    """Pickle obj the way Python 2 (with numpy, scipy and chumpy) would have, at protocol 0 or 2."""
    if protocol not in (0, 2):
        raise ValueError("Python-2 SMAL files use protocol 0 or 2")
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def make_model_data(
    num_joints: int = 35,
    num_betas: int = 41,
    num_verts: int = 80,
    seed: int = 0,
    with_keypoints: bool = True,
) -> SMALModelData:
    """A random, valid SMAL-family model (float64), for loader and layer tests.

    Joints follow the 35-joint layout's parents when num_joints is 33 or 35, else a random tree.
    """
    rng = np.random.default_rng(seed)
    if num_joints in (33, 35):
        parents = np.array(layout.PARENTS_35[:num_joints], dtype=np.int64)
        joint_names = list(layout.JOINT_NAMES_35[:num_joints])
    else:
        parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, num_joints)], dtype=np.int64)
        joint_names = [f"joint{i}" for i in range(num_joints)]
    logits = rng.normal(size=(num_verts, num_joints)) * 3.0
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    j_regressor = np.zeros((num_joints, num_verts))
    for j in range(num_joints):
        idx = rng.choice(num_verts, size=4, replace=False)
        j_regressor[j, idx] = rng.uniform(0.1, 1.0, size=4)
    j_regressor /= j_regressor.sum(axis=1, keepdims=True)
    groups = None
    if with_keypoints:
        groups = [
            sorted(rng.choice(num_verts, size=int(rng.integers(1, 5)), replace=False).tolist())
            for _ in range(26)
        ]
    return SMALModelData(
        v_template=rng.normal(size=(num_verts, 3)) * 0.3,
        shapedirs=rng.normal(size=(num_verts, 3, num_betas)) * 0.02,
        posedirs=rng.normal(size=(num_verts, 3, (num_joints - 1) * 9)) * 0.01,
        j_regressor=j_regressor,
        weights=weights,
        parents=parents,
        faces=rng.integers(0, num_verts, size=(2 * num_verts, 3)).astype(np.int64),
        joint_names=joint_names,
        keypoint_groups=groups,
        name=f"random-{num_joints}j",
    )


def smal_file_dict(data: SMALModelData, old_sparse: bool = False) -> dict[str, Any]:
    """The dict a real SMAL file holds for `data`: chumpy v_template/shapedirs, sparse J_regressor,
    a uint32 kintree_table whose root parent is 4294967295, uint32 faces; plus keypoint_groups if set."""
    kintree = np.stack([data.parents, np.arange(data.num_joints)]).astype(np.int64)
    kintree[0, 0] = ROOT_PARENT
    out: dict[str, Any] = {
        "v_template": FakeCh(data.v_template),
        "shapedirs": FakeCh(data.shapedirs),
        "posedirs": np.asarray(data.posedirs),
        "J_regressor": OldCscMatrix(data.j_regressor)
        if old_sparse
        else scipy.sparse.csc_matrix(data.j_regressor),
        "weights": np.asarray(data.weights),
        "kintree_table": kintree.astype(np.uint32),
        "f": np.asarray(data.faces).astype(np.uint32),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    if data.keypoint_groups is not None:
        out["keypoint_groups"] = [list(g) for g in data.keypoint_groups]
    return out


def write_smal_pickle(path: Path, data: SMALModelData, protocol: int, old_sparse: bool = False) -> Path:
    """Write `data` as a Python-2-style SMAL model pickle; returns path."""
    path.write_bytes(py2_dumps(smal_file_dict(data, old_sparse=old_sparse), protocol))
    return path
