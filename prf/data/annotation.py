"""The per-image annotation: Animal3D's field names plus what 3D-DST generation adds.

One schema serves real Animal3D samples and generated BATCH images, so both go through one loader. Fields
(units; legend: J joints, K = 26 Animal3D keypoints, NB betas):

- ``img_path`` (str), ``mask_path`` (str, optional): relative to the JSON's folder (Animal3D) or to the
  BATCH root (a BATCH annotation). ``mask_area`` (optional, pixels^2): the mask's nonzero pixel count, as
  a BATCH writer records it with the mask (``prf score`` then uses it instead of decoding the mask).
- ``bbox``: [x, y, w, h] pixels; ``width``, ``height``: image size in pixels.
- ``keypoint_2d``: (K, 3) x, y (pixels), visibility; ``keypoint_3d``: (K, 3) metres, SMAL frame;
  ``reproj_kp_2d``: optional (K, 2) or (K, 3).
- ``pose``: J*3 axis-angle (radians), first 3 = global orientation (105 values for the 35-joint model).
- ``shape`` (20) + ``shape_extra`` (21): the 41 betas; a model with fewer betas stores its betas in the first
  entries and zeros after (``shape_extra`` may be omitted: zeros).
- ``trans`` (3, metres); ``category`` (int: Animal3D's 0-39 or our own category table's id);
  ``supercategory`` (int: shape family, 0 cat, 1 dog, 2 horse, 3 cow, 4 hippo).
- 3D-DST additions, optional: ``camera`` {K (3, 3) pixels, R (3, 3), t (3,) metres} with
  x_cam = R X + t for X in the SMAL frame, OpenCV axes (x right, y down, z forward); ``viewpoint``
  {azimuth, elevation, theta (radians), distance (metres)}; ``prompt``, ``seed``, ``backend``,
  ``category_name``.

Unknown keys are kept (``Annotation.extras``) and written back by ``to_json_dict``; they never fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from prf.body.layout import NUM_KEYPOINTS

NUM_SHAPE = 20  # betas 0-19 live in "shape"
NUM_SHAPE_EXTRA = 21  # betas 20-40 live in "shape_extra"
MAX_BETAS = NUM_SHAPE + NUM_SHAPE_EXTRA
ANIMAL3D_DEFAULT_FOCAL_PX = 1000.0  # Animal3D has no intrinsics; the usual assumption (unverified)


class AnnotationError(ValueError):
    """An annotation is invalid. ``path`` names the file, ``field`` the first offending field (dotted, with
    list indices, e.g. ``keypoint_2d[3][1]``), ``index`` the entry of a multi-entry file (or None), and
    ``problems`` lists every (field, message) found."""

    def __init__(
        self,
        message: str,
        path: str | os.PathLike[str] | None = None,
        field: str | None = None,
        index: int | None = None,
        problems: list[tuple[str | None, str]] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.field = field
        self.index = index
        self.problems = problems if problems is not None else [(field, message)]
        where = str(self.path) if self.path is not None else "<annotation>"
        if index is not None:
            where += f" entry {index}"
        super().__init__(f"{where}: {message}")


def _reject_str_and_bool(value: Any) -> Any:
    if isinstance(value, (str, bool)):
        raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


Real = Annotated[float, Strict()]  # int or float; never a string or bool; NaN/inf refused (model config)
Int = Annotated[int, BeforeValidator(_reject_str_and_bool)]


def _check_vector(name: str, values: list[float], length: int, hint: str = "") -> list[float]:
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} values, expected {length}{hint}")
    return values


def _check_matrix(name: str, rows: list[list[float]], n_rows: int, n_cols: tuple[int, ...]) -> None:
    if len(rows) != n_rows:
        raise ValueError(f"{name} has {len(rows)} rows, expected {n_rows}")
    for i, row in enumerate(rows):
        if len(row) not in n_cols:
            want = " or ".join(str(c) for c in n_cols)
            raise ValueError(f"{name} row {i} has {len(row)} values, expected {want}")


class Camera(BaseModel):
    """Pinhole camera: K (3, 3) intrinsics in pixels; x_cam = R X + t, R (3, 3) rotation, t (3,) metres."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    K: list[list[Real]]
    R: list[list[Real]]
    t: list[Real]

    @model_validator(mode="after")
    def _shapes(self) -> Camera:
        _check_matrix("K", self.K, 3, (3,))
        _check_matrix("R", self.R, 3, (3,))
        _check_vector("t", self.t, 3)
        rot = np.asarray(self.R, dtype=np.float64)
        if np.abs(rot.T @ rot - np.eye(3)).max() > 1e-4 or np.linalg.det(rot) <= 0:
            raise ValueError("R is not a rotation matrix (R^T R must be I and det(R) = +1, to 1e-4)")
        return self


class Viewpoint(BaseModel):
    """Sampled viewpoint: azimuth, elevation, theta (in-plane) in radians; distance in metres."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    azimuth: Real
    elevation: Real
    theta: Real
    distance: Real


def _arrays_to_lists(data: Any) -> Any:
    if isinstance(data, np.ndarray):
        return data.tolist()
    if isinstance(data, dict):
        return {k: _arrays_to_lists(v) for k, v in data.items()}
    return data


class Annotation(BaseModel):
    """One image's annotation (see the module docstring for fields, shapes and units)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, validate_assignment=False)

    img_path: str
    mask_path: str | None = None
    bbox: list[Real]
    width: Int
    height: Int
    mask_area: Real | None = None
    keypoint_2d: list[list[Real]]
    keypoint_3d: list[list[Real]]
    pose: list[Real]
    shape: list[Real]
    shape_extra: list[Real] | None = None
    trans: list[Real]
    category: Int
    supercategory: Int
    reproj_kp_2d: list[list[Real]] | None = None
    camera: Camera | None = None
    viewpoint: Viewpoint | None = None
    prompt: str | None = None
    seed: Int | None = None
    backend: str | None = None
    category_name: str | None = None

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, v: list[float]) -> list[float]:
        _check_vector("bbox", v, 4, " ([x, y, w, h] in pixels)")
        if v[2] < 0 or v[3] < 0:
            raise ValueError(f"bbox width and height must be >= 0, got w={v[2]}, h={v[3]}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive number of pixels, got {v}")
        return v

    @field_validator("mask_area")
    @classmethod
    def _mask_area(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None:
            return v
        if v < 0:
            raise ValueError(f"must be >= 0 (pixels^2: the mask's nonzero pixel count), got {v}")
        width, height = info.data.get("width"), info.data.get("height")
        if width is not None and height is not None and v > width * height:
            raise ValueError(f"{v} pixels^2 is more than the whole {width} x {height} image")
        return v

    @field_validator("category", "supercategory")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("keypoint_2d", "keypoint_3d")
    @classmethod
    def _keypoints(cls, v: list[list[float]], info: ValidationInfo) -> list[list[float]]:
        _check_matrix(info.field_name, v, NUM_KEYPOINTS, (3,))
        return v

    @field_validator("reproj_kp_2d")
    @classmethod
    def _reproj(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None:
            _check_matrix("reproj_kp_2d", v, NUM_KEYPOINTS, (2, 3))
        return v

    @field_validator("pose")
    @classmethod
    def _pose(cls, v: list[float]) -> list[float]:
        if len(v) == 0 or len(v) % 3:
            raise ValueError(f"pose has {len(v)} values, expected 3 per joint (axis-angle, J*3 values)")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[float]) -> list[float]:
        return _check_vector(
            "shape", v, NUM_SHAPE, f" (betas 0-{NUM_SHAPE - 1}; betas {NUM_SHAPE}-40 go in shape_extra)"
        )

    @field_validator("shape_extra")
    @classmethod
    def _shape_extra(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            _check_vector("shape_extra", v, NUM_SHAPE_EXTRA, f" (betas {NUM_SHAPE}-40)")
        return v

    @field_validator("trans")
    @classmethod
    def _trans(cls, v: list[float]) -> list[float]:
        return _check_vector("trans", v, 3)

    # ---- loading and validation -------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        data: Any,
        path: str | os.PathLike[str] | None = None,
        index: int | None = None,
        num_joints: int | None = None,
        num_betas: int | None = None,
    ) -> Annotation:
        """Validate a JSON-like dict (numpy arrays allowed). Errors are AnnotationError naming ``path``,
        ``index`` and the field; ``num_joints`` / ``num_betas`` add the model checks of ``validate_for``."""
        if not isinstance(data, dict):
            raise AnnotationError(
                f"expected a JSON object with Animal3D fields, got {type(data).__name__}", path, None, index
            )
        try:
            # numpy arrays become lists here, not in a "before" model validator: one of those makes
            # pydantic build the whole Python dict in model_validate_json too (~35 us more per file)
            annotation = cls.model_validate(_arrays_to_lists(data))
        except ValidationError as err:
            raise _to_annotation_error(err, path, index) from None
        annotation.validate_for(num_joints, num_betas, path=path, index=index)
        return annotation

    @classmethod
    def from_json_file(
        cls, path: str | os.PathLike[str], num_joints: int | None = None, num_betas: int | None = None
    ) -> Annotation:
        """Read and validate one annotation JSON file (errors name the file and the field)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AnnotationError("annotation file not found", path) from None
        except (OSError, UnicodeDecodeError) as err:
            raise AnnotationError(f"cannot read the file ({err})", path) from None
        try:  # pydantic's own JSON parser: ~0.1 ms less per file than json.loads + model_validate
            annotation = cls.model_validate_json(text)
        except ValidationError:  # the path below names the problem as the dict path does
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise AnnotationError(f"not valid JSON ({err})", path) from None
            return cls.from_dict(data, path=path, num_joints=num_joints, num_betas=num_betas)
        return annotation.validate_for(num_joints, num_betas, path=path)

    def validate_for(
        self,
        num_joints: int | None = None,
        num_betas: int | None = None,
        path: str | os.PathLike[str] | None = None,
        index: int | None = None,
    ) -> Annotation:
        """Check the annotation fits a body model with ``num_joints`` joints and ``num_betas`` betas.

        The pose must hold exactly ``num_joints * 3`` values. ``num_betas`` must be within 1..41 (the
        annotation always carries 41 slots; ``betas`` truncates or zero-pads). Returns self.
        """
        if num_joints is not None and len(self.pose) != 3 * num_joints:
            raise AnnotationError(
                f"field 'pose': pose has {len(self.pose)} values, expected {3 * num_joints} for a "
                f"{num_joints}-joint model",
                path,
                "pose",
                index,
            )
        if num_betas is not None and not 1 <= num_betas <= MAX_BETAS:
            raise ValueError(
                f"num_betas must be in 1..{MAX_BETAS} (shape 20 + shape_extra 21), got {num_betas}"
            )
        return self

    # ---- array views ----------------------------------------------------------------------------

    @property
    def extras(self) -> dict[str, Any]:
        """Unknown keys found in the source, kept verbatim."""
        return dict(self.model_extra or {})

    @property
    def num_joints(self) -> int:
        return len(self.pose) // 3

    def betas(self, num_betas: int = MAX_BETAS) -> np.ndarray:
        """(num_betas,) float64: shape + shape_extra, truncated or zero-padded to ``num_betas``."""
        all_betas = np.zeros(max(num_betas, MAX_BETAS), dtype=np.float64)
        all_betas[:NUM_SHAPE] = self.shape
        if self.shape_extra is not None:
            all_betas[NUM_SHAPE:MAX_BETAS] = self.shape_extra
        return all_betas[:num_betas].copy()

    def pose_array(self, num_joints: int | None = None) -> np.ndarray:
        """(J, 3) float64 axis-angle in radians, row 0 = global orientation. Checks J if given."""
        if num_joints is not None:
            self.validate_for(num_joints)
        return np.asarray(self.pose, dtype=np.float64).reshape(-1, 3)

    def keypoints_2d_array(self) -> np.ndarray:
        """(26, 3) float64: x, y in pixels, visibility."""
        return np.asarray(self.keypoint_2d, dtype=np.float64)

    def keypoints_3d_array(self) -> np.ndarray:
        """(26, 3) float64 metres, SMAL frame."""
        return np.asarray(self.keypoint_3d, dtype=np.float64)

    def trans_array(self) -> np.ndarray:
        """(3,) float64 metres."""
        return np.asarray(self.trans, dtype=np.float64)

    def intrinsics(self, default_focal_px: float = ANIMAL3D_DEFAULT_FOCAL_PX) -> np.ndarray:
        """(3, 3) float64 K: the camera's if present, else focal ``default_focal_px`` and the image centre
        as principal point (Animal3D samples carry no intrinsics). Pixel centres are at integers
        (prf.geometry), so the centre is ((W - 1) / 2, (H - 1) / 2)."""
        if self.camera is not None:
            return np.asarray(self.camera.K, dtype=np.float64)
        return np.array(
            [
                [default_focal_px, 0.0, (self.width - 1) / 2.0],
                [0.0, default_focal_px, (self.height - 1) / 2.0],
                [0, 0, 1.0],
            ]
        )

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict with Animal3D field names (betas split shape 20 / shape_extra 21); optional
        fields that are unset are left out; unknown keys are written back."""
        return self.model_dump(mode="json", exclude_none=True)


def split_betas(betas: np.ndarray | list[float]) -> tuple[list[float], list[float]]:
    """(NB,) betas with NB <= 41 -> (shape (20,), shape_extra (21,)) lists, zero-padded."""
    flat = np.asarray(betas, dtype=np.float64).reshape(-1)
    if flat.size > MAX_BETAS:
        raise ValueError(f"got {flat.size} betas; the annotation format holds at most {MAX_BETAS}")
    padded = np.zeros(MAX_BETAS)
    padded[: flat.size] = flat
    return padded[:NUM_SHAPE].tolist(), padded[NUM_SHAPE:].tolist()


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _to_annotation_error(
    err: ValidationError, path: str | os.PathLike[str] | None, index: int | None
) -> AnnotationError:
    problems: list[tuple[str | None, str]] = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = _format_loc(loc) or None
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "finite_number":
            message = "NaN or infinite value (every number must be finite)"
        problems.append((field, message))
    first_field, first_message = problems[0]
    summary = f"field '{first_field}': {first_message}"
    if len(problems) > 1:
        others = "; ".join(f"'{f}': {m}" for f, m in problems[1:4])
        summary += f" (and {len(problems) - 1} more: {others}{'; ...' if len(problems) > 4 else ''})"
    return AnnotationError(summary, path, first_field, index, problems)
