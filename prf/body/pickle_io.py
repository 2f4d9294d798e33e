"""Safe loading of SMAL-format pickles (Python 2, chumpy, scipy.sparse) and writing them back.

A pickle is a program: unpickling an untrusted file can run any code. The real SMAL files are Python-2
pickles whose arrays are numpy arrays, chumpy objects and a scipy sparse J_regressor, so they are read here
with a restricted unpickler that resolves only an explicit allow-list of names:

- numpy: ``ndarray``, ``dtype``, ``core/_core.multiarray._reconstruct`` and ``scalar``,
  ``core/_core.numeric._frombuffer``;
- scipy.sparse csc/csr/coo matrices (and arrays), under any of their module paths old and new
  (``scipy.sparse.csc``, ``scipy.sparse._csc``, ``scipy.sparse.compressed``, ...); they are read into a
  stand-in that keeps the pickled state and are rebuilt with scipy's public constructors afterwards, so
  pickles written by any scipy version load;
- chumpy (``chumpy.ch.Ch``, ``chumpy.ch_ops.*``, ``chumpy.reordering.*``, any ``chumpy.*``): a stand-in
  whose ``__setstate__`` keeps the state dict; one holding an array (key ``'x'``) becomes that array;
- ``copy_reg/copyreg._reconstructor`` (only to build the stand-ins from ``object``), ``__builtin__/builtins``
  ``object``, ``set``, ``frozenset``, and ``_codecs.encode`` for latin-1 only (how Python 3 writes bytes at
  protocol 2).

Anything else raises `ForbiddenPickleClass` before it is called.

Legend: V vertices, F faces, J joints, NB shape betas, P = (J-1)*9, K shape families.
"""

from __future__ import annotations

import copyreg
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy._core.multiarray as _np_multiarray
import numpy._core.numeric as _np_numeric
import scipy.sparse

if TYPE_CHECKING:
    from prf.body.model_data import SMALModelData

__all__ = [
    "ChumpyStandIn",
    "ForbiddenPickleClass",
    "RestrictedUnpickler",
    "SMALFileError",
    "SMALFileNotFoundError",
    "load_pickle_restricted",
    "load_smal_model_data",
    "save_smal_pickle",
]


class SMALFileError(ValueError):
    """A SMAL-format file (model, shape-family data, prior) is missing, unreadable or malformed."""


class SMALFileNotFoundError(SMALFileError, FileNotFoundError):
    """The SMAL-format file does not exist."""


class ForbiddenPickleClass(SMALFileError):  # noqa: N818 (the name the project's API uses)
    """The pickle refers to a module attribute outside the allow-list (it could run arbitrary code)."""


class ChumpyStandIn:
    """Stand-in for a chumpy object: keeps the pickled state dict (the array of a ``Ch`` is under ``'x'``).

    Objects that hold an ``'x'`` array are replaced by that array after loading; others (chumpy expression
    nodes such as ``ch_ops.add``) stay stand-ins, and `chumpy_class` names what they were.
    """

    chumpy_class: ClassVar[str] = "chumpy"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"<stand-in for {self.chumpy_class} with keys {sorted(getattr(self, 'state', {}))}>"


class _SparseStandIn:
    """Stand-in for a scipy.sparse matrix/array: keeps the pickled attribute dict until it is rebuilt."""

    sparse_format: ClassVar[str] = "csc"
    sparse_class: ClassVar[str] = "csc_matrix"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict):
            raise SMALFileError(f"scipy.sparse {self.sparse_class} in the pickle has no attribute dict")
        self.state = dict(state)

    def to_scipy(self) -> scipy.sparse.spmatrix | scipy.sparse.sparray:
        """Rebuild the real scipy.sparse object from the pickled attributes."""
        st = self.state
        shape = st.get("_shape", st.get("shape"))
        if shape is None:
            raise SMALFileError(f"pickled {self.sparse_class} has no shape (keys: {sorted(st)})")
        shape = tuple(int(s) for s in shape)
        cls = getattr(scipy.sparse, self.sparse_class)
        try:
            if self.sparse_format == "coo":
                if "coords" in st:
                    row, col = st["coords"]
                else:
                    row, col = st["row"], st["col"]
                return cls((np.asarray(st["data"]), (np.asarray(row), np.asarray(col))), shape=shape)
            return cls(
                (np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"])), shape=shape
            )
        except KeyError as err:
            raise SMALFileError(
                f"pickled {self.sparse_class} lacks the attribute {err} (keys: {sorted(st)})"
            ) from err


_SPARSE_MODULES = frozenset(
    f"scipy.sparse{suffix}"
    for suffix in (
        "", ".csc", "._csc", ".csr", "._csr", ".coo", "._coo", ".compressed", "._compressed",
        ".base", "._base", "._arrays", ".sparsetools", "._matrix",
    )
)  # fmt: skip
_SPARSE_CLASSES = ("csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array")


def _safe_reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to building one of the stand-ins from ``object``."""
    if base is not object or not isinstance(cls, type) or not issubclass(cls, ChumpyStandIn | _SparseStandIn):
        raise ForbiddenPickleClass(
            f"copy_reg._reconstructor called with ({cls!r}, {base!r}); only chumpy / scipy.sparse objects "
            "built from object are allowed"
        )
    return copyreg._reconstructor(cls, base, state)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocols 0-2 (latin-1 only)."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise ForbiddenPickleClass(f"_codecs.encode with encoding {encoding!r}: only latin-1 is allowed")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _np_multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _np_multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _np_numeric._frombuffer
for _mod in ("__builtin__", "builtins"):
    _ALLOWED[(_mod, "object")] = object
    _ALLOWED[(_mod, "set")] = set
    _ALLOWED[(_mod, "frozenset")] = frozenset
for _mod in ("copy_reg", "copyreg"):
    _ALLOWED[(_mod, "_reconstructor")] = _safe_reconstructor

_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type | None:
    """The stand-in class for a chumpy or scipy.sparse name, or None if the name is neither."""
    key = (module, name)
    if key in _STAND_INS:
        return _STAND_INS[key]
    if (module == "chumpy" or module.startswith("chumpy.")) and name.isidentifier():
        cls: type = type(f"Chumpy_{name}", (ChumpyStandIn,), {"chumpy_class": f"{module}.{name}"})
    elif module in _SPARSE_MODULES and name in _SPARSE_CLASSES:
        cls = type(f"Sparse_{name}", (_SparseStandIn,), {"sparse_format": name[:3], "sparse_class": name})
    else:
        return None
    _STAND_INS[key] = cls
    return cls


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-list in this module's docstring (latin-1 for Python 2 str)."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        stand_in = _stand_in(module, name)
        if stand_in is not None:
            return stand_in
        raise ForbiddenPickleClass(
            f"{self._source}: the pickle refers to {module}.{name}, which is not allowed (only numpy "
            "arrays, scipy.sparse matrices and chumpy arrays may appear in a SMAL file). Refusing to load "
            "it: a pickle can run arbitrary code. Re-save the file with plain numpy arrays if you trust it."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickleClass(f"{self._source}: persistent ids are not allowed in a SMAL file")


def _convert(obj: Any, memo: dict[int, Any]) -> Any:
    """Replace stand-ins by numpy arrays / scipy.sparse objects, recursively through containers."""
    key = id(obj)
    if key in memo:
        return memo[key]
    out = obj
    if isinstance(obj, ChumpyStandIn):
        if "x" in obj.__dict__.get("state", {}):
            out = np.asarray(_convert(obj.state["x"], memo))
    elif isinstance(obj, _SparseStandIn):
        out = obj.to_scipy()
    elif isinstance(obj, dict):
        memo[key] = out = {}
        out.update({k: _convert(v, memo) for k, v in obj.items()})
    elif isinstance(obj, list):
        memo[key] = out = []
        out.extend(_convert(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_convert(v, memo) for v in obj)
    elif isinstance(obj, np.ndarray) and obj.dtype == object:
        out = np.empty(obj.shape, dtype=object)
        for idx, v in np.ndenumerate(obj):
            out[idx] = _convert(v, memo)
    memo[key] = out
    return out


def _read_npy_header(fh: Any, src: str) -> np.dtype:
    """Skip a .npy header (parsed by numpy without unpickling) and return the array's dtype."""
    import numpy.lib.format as npy_format

    version = npy_format.read_magic(fh)
    if version == (1, 0):
        _, _, dtype = npy_format.read_array_header_1_0(fh)
    elif version == (2, 0):
        _, _, dtype = npy_format.read_array_header_2_0(fh)
    else:
        raise SMALFileError(f"{src}: unsupported .npy format version {version}")
    return dtype


def load_pickle_restricted(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a (Python 2 or 3) pickle holding a dict of numpy / scipy.sparse / chumpy values, safely.

    Chumpy arrays come back as numpy arrays, sparse matrices as scipy.sparse objects, Python-2 ``str`` as
    ``str`` (latin-1). A ``.npy`` file holding a pickled dict (``np.save(path, a_dict)``, as 3D-DST
    annotations are stored) is read the same way. Used for SMAL model files, the shape-family file and
    annotation dicts.

    Raises:
        SMALFileNotFoundError: no such file.
        ForbiddenPickleClass: the pickle names anything outside the allow-list (nothing is called).
        SMALFileError: not a readable pickle, or its top-level object is not a dict.
    """
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise SMALFileNotFoundError(f"{src}: no such file (give the path of a SMAL-format .pkl file)")
    try:
        with path.open("rb") as fh:
            is_npy = fh.read(6) == b"\x93NUMPY"
            fh.seek(0)
            if is_npy and (dtype := _read_npy_header(fh, src)).kind != "O":
                raise SMALFileError(f"{src}: a .npy file of dtype {dtype}, expected a pickled dict")
            obj = RestrictedUnpickler(fh, source=src).load()
    except SMALFileError as err:
        if str(err).startswith(src):
            raise
        raise type(err)(f"{src}: {err}") from err
    except Exception as err:
        raise SMALFileError(f"{src}: not a readable pickle ({type(err).__name__}: {err})") from err
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise SMALFileError(f"{src}: expected a pickled dict, found {type(obj).__name__}")
    return _convert(obj, {})


# ----------------------------------------------------------------------------------------------------------
# SMAL model files
# ----------------------------------------------------------------------------------------------------------
_REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
_OPTIONAL_KEYS = ("joint_names", "keypoint_groups", "part_labels", "beta_names", "name", "family_means")
ROOT_PARENT_IN_FILE = 4294967295  # what SMAL/SMPL files store as the root's parent (uint32 -1)


def _array(raw: dict[str, Any], key: str, src: str, dtype: type = np.float64) -> np.ndarray:
    """raw[key] as a finite numpy array (sparse matrices densified)."""
    value = raw[key]
    if isinstance(value, ChumpyStandIn):
        raise SMALFileError(
            f"{src}: {key} is a chumpy {value.chumpy_class} expression with no stored array ('x'); "
            "evaluate it with chumpy and re-save the file with plain numpy arrays"
        )
    if scipy.sparse.issparse(value):
        value = value.toarray()
    try:
        arr = np.asarray(value).astype(dtype)
    except (TypeError, ValueError) as err:
        raise SMALFileError(f"{src}: {key} is not a numeric array ({type(value).__name__}: {err})") from err
    if not np.isfinite(arr).all():
        raise SMALFileError(f"{src}: {key} contains NaN or infinite values")
    return arr


def _check_shape(arr: np.ndarray, expected: tuple[int | None, ...], key: str, src: str, legend: str) -> None:
    """Raise if arr's shape differs from expected (None = any size); legend names the dims, e.g. '(V, 3)'."""
    ok = arr.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, arr.shape, strict=False)
    )
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
        raise SMALFileError(f"{src}: {key} has shape {arr.shape}, expected {legend} = {want}")


def _parents_from_kintree(kintree: np.ndarray, src: str) -> np.ndarray:
    """(J,) parent column of each joint from a (2, J) kintree_table (row 0 parent ids, row 1 joint ids)."""
    num_joints = kintree.shape[1]
    column_of = {int(joint_id): c for c, joint_id in enumerate(kintree[1])}
    if len(column_of) != num_joints:
        raise SMALFileError(
            f"{src}: kintree_table row 1 (joint ids) has duplicate ids: {kintree[1].tolist()}"
        )
    parents = np.full(num_joints, -1, dtype=np.int64)
    for c in range(1, num_joints):
        parent = column_of.get(int(kintree[0, c]))
        if parent is None or parent >= c:
            raise SMALFileError(
                f"{src}: kintree_table column {c} has parent id {int(kintree[0, c])}, which is not a joint "
                "listed before it (joints must be ordered parents first)"
            )
        parents[c] = parent
    return parents


def _keypoint_groups(raw: dict[str, Any], num_verts: int, src: str) -> list[list[int]] | None:
    """The 26 keypoint vertex groups: the file's own, else the real SMAL mesh's (V == 3889), else None."""
    from prf.body import layout

    if "keypoint_groups" not in raw:
        if num_verts == layout.SMAL_NUM_VERTICES:
            return [list(g) for g in layout.SMAL_KEYPOINT_VERTEX_GROUPS]
        return None
    try:
        groups = [[int(i) for i in np.asarray(g).ravel()] for g in raw["keypoint_groups"]]
    except (TypeError, ValueError) as err:
        raise SMALFileError(
            f"{src}: keypoint_groups must be a list of lists of vertex indices ({err})"
        ) from err
    if len(groups) != layout.NUM_KEYPOINTS:
        raise SMALFileError(
            f"{src}: keypoint_groups has {len(groups)} groups, expected {layout.NUM_KEYPOINTS}"
        )
    for k, group in enumerate(groups):
        if not group or min(group) < 0 or max(group) >= num_verts:
            raise SMALFileError(
                f"{src}: keypoint_groups[{k}] = {group} must be non-empty indices in [0, {num_verts})"
            )
    return groups


def _family_means(value: Any, num_betas: int, src: str, key: str) -> np.ndarray:
    means = _array({key: value}, key, src)
    if means.ndim != 2 or means.shape[1] > num_betas:
        raise SMALFileError(
            f"{src}: {key} has shape {means.shape}, expected (K, NB') with NB' <= NB = {num_betas}"
        )
    return means


def _string_list(raw: dict[str, Any], key: str, length: int, src: str) -> list[str] | None:
    if key not in raw:
        return None
    names = [str(n) for n in raw[key]]
    if len(names) != length:
        raise SMALFileError(f"{src}: {key} has {len(names)} entries, expected {length}")
    return names


def load_smal_model_data(
    path: str | os.PathLike[str], family_data: str | os.PathLike[str] | None = None
) -> SMALModelData:
    """Read a SMAL model pickle (33- or 35-joint, any number of betas) into a validated `SMALModelData`.

    Args:
        path: the model file (e.g. ``my_smpl_00781_4_all.pkl``): v_template (V, 3), shapedirs (V, 3, NB),
            posedirs (V, 3, (J-1)*9), J_regressor (J, V) sparse or dense, weights (V, J), kintree_table
            (2, J), f (F, 3); optional joint_names, keypoint_groups, part_labels, beta_names, name,
            family_means.
        family_data: optional shape-family file (e.g. ``my_smpl_data_00781_4_all.pkl``) whose
            ``cluster_means`` (K, NB') become ``family_means``.

    Raises:
        SMALFileError (or a subclass): missing file, forbidden class, missing key, wrong shape; the message
        names the file and the key.
    """
    from prf.body import layout
    from prf.body.model_data import SMALModelData

    src = str(path)
    raw = load_pickle_restricted(path)
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise SMALFileError(f"{src}: not a SMAL model file: missing keys {missing} (found {sorted(raw)})")
    v_template = _array(raw, "v_template", src)
    _check_shape(v_template, (None, 3), "v_template", src, "(V, 3)")
    num_verts = v_template.shape[0]
    kintree = _array(raw, "kintree_table", src, np.int64)
    _check_shape(kintree, (2, None), "kintree_table", src, "(2, J)")
    parents = _parents_from_kintree(kintree, src)
    num_joints = parents.shape[0]
    shapedirs = _array(raw, "shapedirs", src)
    _check_shape(shapedirs, (num_verts, 3, None), "shapedirs", src, "(V, 3, NB)")
    posedirs = _array(raw, "posedirs", src)
    _check_shape(posedirs, (num_verts, 3, (num_joints - 1) * 9), "posedirs", src, "(V, 3, (J-1)*9)")
    j_regressor = _array(raw, "J_regressor", src)
    _check_shape(j_regressor, (num_joints, num_verts), "J_regressor", src, "(J, V)")
    weights = _array(raw, "weights", src)
    _check_shape(weights, (num_verts, num_joints), "weights", src, "(V, J)")
    faces = _array(raw, "f", src, np.int64)
    _check_shape(faces, (None, 3), "f", src, "(F, 3)")
    if faces.size and (faces.min() < 0 or faces.max() >= num_verts):
        raise SMALFileError(f"{src}: f has vertex indices outside [0, {num_verts})")

    default_names = layout.JOINT_NAMES_35[:num_joints] if num_joints in (33, 35) else None
    joint_names = _string_list(raw, "joint_names", num_joints, src) or list(
        default_names or [f"joint{i}" for i in range(num_joints)]
    )
    part_labels = None
    if "part_labels" in raw:
        part_labels = _array(raw, "part_labels", src, np.int64)
        _check_shape(part_labels, (num_verts,), "part_labels", src, "(V,)")
        if part_labels.min() < 1 or part_labels.max() >= len(layout.FINE_PARTS):
            raise SMALFileError(
                f"{src}: part_labels must lie in [1, {len(layout.FINE_PARTS)}) (0 is background)"
            )
    num_betas = shapedirs.shape[2]
    family_means = None
    if family_data is not None:
        family_raw = load_pickle_restricted(family_data)
        if "cluster_means" not in family_raw:
            raise SMALFileError(f"{family_data}: no cluster_means key (found {sorted(family_raw)})")
        family_means = _family_means(
            family_raw["cluster_means"], num_betas, str(family_data), "cluster_means"
        )
    elif "family_means" in raw:
        family_means = _family_means(raw["family_means"], num_betas, src, "family_means")
    extra = {
        k: v
        for k, v in raw.items()
        if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS and isinstance(v, np.ndarray) and v.dtype != object
    }
    return SMALModelData(
        v_template=v_template,
        shapedirs=shapedirs,
        posedirs=posedirs,
        j_regressor=j_regressor,
        weights=weights,
        parents=parents,
        faces=faces,
        joint_names=joint_names,
        keypoint_groups=_keypoint_groups(raw, num_verts, src),
        part_labels=part_labels,
        family_means=family_means,
        beta_names=_string_list(raw, "beta_names", num_betas, src),
        name=str(raw["name"]) if "name" in raw else Path(path).stem,
        extra=extra,
    )


def save_smal_pickle(data: SMALModelData, path: str | os.PathLike[str]) -> None:
    """Write `data` as a SMAL-format pickle (protocol 2) that `load_smal_model_data` reads back exactly.

    Keys: the SMAL file's (v_template, shapedirs, posedirs, J_regressor as scipy.sparse.csc_matrix,
    weights, kintree_table (2, J) with the root's parent stored as 4294967295, f) plus joint_names, name and,
    when set, keypoint_groups, part_labels, beta_names, family_means and the `extra` arrays. Only numpy,
    scipy and builtin values are written.
    """
    clash = sorted(set(data.extra) & set(_REQUIRED_KEYS + _OPTIONAL_KEYS))
    if clash:
        raise ValueError(f"SMALModelData.extra uses reserved key(s) {clash}; rename them")
    parents = np.asarray(data.parents, dtype=np.int64).copy()
    parents[0] = ROOT_PARENT_IN_FILE
    out: dict[str, Any] = {
        "v_template": np.asarray(data.v_template, dtype=np.float64),
        "shapedirs": np.asarray(data.shapedirs, dtype=np.float64),
        "posedirs": np.asarray(data.posedirs, dtype=np.float64),
        "J_regressor": scipy.sparse.csc_matrix(np.asarray(data.j_regressor, dtype=np.float64)),
        "weights": np.asarray(data.weights, dtype=np.float64),
        "kintree_table": np.stack([parents, np.arange(parents.shape[0], dtype=np.int64)]),
        "f": np.asarray(data.faces, dtype=np.int64),
        "joint_names": [str(n) for n in data.joint_names],
        "name": str(data.name),
    }
    if data.keypoint_groups is not None:
        out["keypoint_groups"] = [[int(i) for i in group] for group in data.keypoint_groups]
    if data.part_labels is not None:
        out["part_labels"] = np.asarray(data.part_labels, dtype=np.int64)
    if data.beta_names is not None:
        out["beta_names"] = [str(n) for n in data.beta_names]
    if data.family_means is not None:
        out["family_means"] = np.asarray(data.family_means, dtype=np.float64)
    out.update({k: np.asarray(v) for k, v in data.extra.items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        pickle.dump(out, fh, protocol=2)
    os.replace(tmp, path)
