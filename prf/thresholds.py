"""thresholds.yaml: the per-model thresholds of ``prf score`` (pydantic schema, loading, checks, writing).

Units: PA-MPJPE and S-MPJPE in "mm" (SMAL units x 1000), PCK ``min`` in PERCENT (the paper's 95.83), the
optional ``max_keypoint_error_max`` in units of sqrt(silhouette area) (image pixels / sqrt(mask area in
pixels^2)), the optional ``max_relative_keypoint_error.max`` in multiples of each keypoint's own ``scales``
entry (that keypoint's typical error on faithful images, sqrt(mask area) units, from ``prf calibrate``),
widened where the model's flip test disagrees with itself (``flip_weight``, unitless).
Every key is checked (unknown keys, wrong types, missing sections are errors that name the file and the
dotted key path) when the file is loaded, which ``prf score`` does before any model is loaded.

Example (docs/thresholds.md has the full reference)::

    combine: all                 # all: keep an image only if every model keeps it; any: if one does
    models:
      A:
        checkpoint: checkpoints/prf_model_a.pt   # optional; relative to this file's folder
        calibrated_for_sha256: 3b8858...         # optional; written by prf calibrate (below)
        pa_mpjpe_max: 108.06                     # mm, or null (not checked)
        s_mpjpe_max: 499.99                      # mm, or null
        pck: {alpha: 0.15, normalization: mask_area, min: 95.83}   # min in %, or pck: null
        max_keypoint_error_max: null             # sqrt(mask area) units, or null (default: off)
        max_relative_keypoint_error: null        # {max: 4.1, scales: [26 numbers], flip_weight: 0.25},
                                                 # or null (default)
      B: {...}

``calibrated_for_sha256`` (64 hex digits) names the checkpoint whose scores the thresholds were fitted to;
``prf score`` warns (``CalibrationMismatchWarning``) when it scores that model with another checkpoint,
since thresholds fitted to one regressor's error scale mean little for another's.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

# Animal3D's 26 keypoints: prf.body.layout.NUM_KEYPOINTS, not imported because importing prf.body loads
# torch (2 s), and a thresholds file is checked before anything heavy is loaded
NUM_KEYPOINTS = 26
MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,15}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Metric column suffix -> (thresholds key, comparison that KEEPS an image, unit).
METRICS: dict[str, tuple[str, str, str]] = {
    "pa_mpjpe": ("pa_mpjpe_max", "<=", "mm"),
    "s_mpjpe": ("s_mpjpe_max", "<=", "mm"),
    "pck": ("pck.min", ">=", "%"),
    "max_kp_error": ("max_keypoint_error_max", "<=", "sqrt(mask area)"),
    "max_rel_kp_error": ("max_relative_keypoint_error.max", "<=", "x the keypoint's scale"),
}


Number = Annotated[float, Strict()]  # an int or float; never a string or a bool


class ThresholdsError(ValueError):
    """A thresholds file is invalid; the message names the file and the key path (``models.A.pck.min``)."""


class CalibrationMismatchWarning(UserWarning):
    """A model is scored with another checkpoint than the one its thresholds were calibrated for."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PCKThreshold(_Strict):
    """PCK@alpha: share of visible keypoints within ``alpha * normaliser`` of the annotation, in percent.

    ``normalization``: ``mask_area`` (sqrt of the silhouette area, Animal3D / BARC style; images without a
    mask fall back to sqrt(w h) of the bbox) or ``bbox`` (max(w, h) of the annotation's bbox).
    """

    alpha: Number = Field(0.15, gt=0.0, le=1.0)
    normalization: Literal["mask_area", "bbox"] = "mask_area"
    min: Number = Field(ge=0.0, le=100.0)

    @field_validator("min")
    @classmethod
    def _percent(cls, value: float) -> float:
        if 0.0 < value <= 1.0:
            raise ValueError(
                f"{value} looks like a share; pck.min is in PERCENT (the paper's 95.83 means 95.83 %)"
            )
        return value


class RelativeKeypointErrorThreshold(_Strict):
    """The largest 2D keypoint error with each keypoint measured against its own expected error.

    ``max_n e_n / (scales[n] + flip_weight * g_n)`` over the visible keypoints n, where ``e_n`` is keypoint
    n's error in sqrt(mask area) units (the ``max_kp_error`` unit), ``scales[n]`` the model's median ``e_n``
    on faithful images, and ``g_n`` how far apart the flip test's two passes put keypoint n (same unit; the
    SCORES' ``<M>_keypoint_flip_gaps``). A regressor is much less precise on some keypoints (paws, the tail
    tip) than on others (the neck, the thighs), so one cut for all keypoints either lets a misplaced thigh
    through or rejects images for an ordinary paw error; and where its two passes disagree the network is
    unsure of that keypoint on this image, so a large error there is less telling than where they agree.
    ``prf calibrate --metric max_rel_kp_error`` measures the scales, picks ``flip_weight`` (0: off) and
    chooses ``max``. A positive ``flip_weight`` needs a checkpoint with a flip test (a keypoint head).
    """

    max: Number = Field(gt=0.0)
    scales: list[Number] = Field(min_length=NUM_KEYPOINTS, max_length=NUM_KEYPOINTS)
    flip_weight: Number = Field(0.0, ge=0.0)

    @field_validator("scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        bad = [i for i, value in enumerate(scales) if not value > 0.0]
        if bad:
            raise ValueError(f"every scale must be > 0 (sqrt(mask area) units); entries {bad} are not")
        return scales


@dataclass(frozen=True)
class Check:
    """One threshold of one model: ``metric`` (column suffix), ``op`` ("<=" or ">=" keeps), ``limit``."""

    metric: str
    op: str
    limit: float

    def passes(self, value: float) -> bool:
        """NaN (an undefined metric) never passes."""
        if not math.isfinite(value):
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def describe_failure(self, value: float) -> str:
        """E.g. ``pck 83.3 < 95.83`` or ``pa_mpjpe undefined``."""
        if not math.isfinite(value):
            return f"{self.metric} undefined"
        flipped = ">" if self.op == "<=" else "<"
        shown = f"{value:.1f}" if abs(value) >= 10 or value == 0 else f"{value:.3g}"
        return f"{self.metric} {shown} {flipped} {self.limit:g}"


class ModelThresholds(_Strict):
    """Thresholds of one model; each is optional (null = not checked) but at least one must be set."""

    checkpoint: str | None = None
    calibrated_for_sha256: str | None = None
    pa_mpjpe_max: Number | None = Field(gt=0.0)
    s_mpjpe_max: Number | None = Field(gt=0.0)
    pck: PCKThreshold | None
    max_keypoint_error_max: Number | None = Field(None, gt=0.0)
    max_relative_keypoint_error: RelativeKeypointErrorThreshold | None = None

    @field_validator("calibrated_for_sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_HEX.match(value):
            raise ValueError(f"must be a sha256 digest (64 lowercase hex digits), got {value!r}")
        return value

    @model_validator(mode="after")
    def _something_checked(self) -> ModelThresholds:
        if not self.checks():
            raise ValueError(
                "sets no threshold, so this model would keep every image; set at least one of "
                "pa_mpjpe_max, s_mpjpe_max, pck, max_keypoint_error_max, max_relative_keypoint_error"
            )
        return self

    @property
    def pck_settings(self) -> PCKThreshold:
        """The PCK alpha / normalisation used for the ``pck`` column (defaults when pck is null)."""
        return self.pck if self.pck is not None else PCKThreshold(min=0.0)

    def checks(self) -> list[Check]:
        """The thresholds that are set, in METRICS order (pa_mpjpe, s_mpjpe, pck, max_kp_error, ...)."""
        out = []
        if self.pa_mpjpe_max is not None:
            out.append(Check("pa_mpjpe", "<=", self.pa_mpjpe_max))
        if self.s_mpjpe_max is not None:
            out.append(Check("s_mpjpe", "<=", self.s_mpjpe_max))
        if self.pck is not None:
            out.append(Check("pck", ">=", self.pck.min))
        if self.max_keypoint_error_max is not None:
            out.append(Check("max_kp_error", "<=", self.max_keypoint_error_max))
        if self.max_relative_keypoint_error is not None:
            out.append(Check("max_rel_kp_error", "<=", self.max_relative_keypoint_error.max))
        return out


class ThresholdsConfig(_Strict):
    """The whole file: ``combine`` rule and ``models`` (name -> ModelThresholds, in file order)."""

    version: Literal[1] = 1
    combine: Literal["all", "any"] = "all"
    models: dict[str, ModelThresholds]

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, ModelThresholds]) -> dict[str, ModelThresholds]:
        if not models:
            raise ValueError("needs at least one model (PRF uses two: A and B)")
        for name in models:
            if not MODEL_NAME.match(name):
                raise ValueError(
                    f"model name {name!r} must be 1-16 letters/digits starting with a letter (it becomes a "
                    "column prefix such as A_pck)"
                )
        return models

    def model_names(self) -> list[str]:
        return list(self.models)


@dataclass(frozen=True)
class ThresholdsFile:
    """A loaded thresholds file: the validated config, where it came from, its text and sha256."""

    config: ThresholdsConfig
    path: Path | None
    text: str
    sha256: str

    def checkpoint_path(self, name: str) -> Path | None:
        """Model ``name``'s ``checkpoint`` resolved against the file's folder (None when unset)."""
        return resolve_checkpoint(self.config.models[name].checkpoint, self.path)


def resolve_checkpoint(value: str | None, thresholds_path: Path | None) -> Path | None:
    """A ``checkpoint`` key as a path: relative keys are relative to the thresholds file's folder (left
    relative when the file has no path); None stays None."""
    if value is None:
        return None
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or thresholds_path is None:
        return candidate
    return thresholds_path.parent / candidate


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-")) or "<top level>"


def _format_errors(err: ValidationError, source: str) -> str:
    problems = []
    for item in err.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; docs/thresholds.md lists the keys)"
        elif item["type"] == "missing":
            message = "required key is missing"
            if len(item["loc"]) == 3 and item["loc"][0] == "models":
                message += " (write null to switch a threshold off)"
        problems.append(f"{_key_path(item['loc'])}: {message}")
    extra = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{extra}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, so a threshold written twice would be half ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_thresholds(text: str, source: str = "<thresholds>", path: Path | None = None) -> ThresholdsFile:
    """Validate YAML text; ``source`` names it in errors, ``path`` (if any) anchors relative checkpoints."""
    name = source
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a yaml.SafeLoader: no Python tags
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ThresholdsError(f"{name}: not valid YAML{line} ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ThresholdsError(
            f"{name}: expected a mapping with 'models' (and optionally 'combine'), got {type(data).__name__}"
        )
    try:
        config = ThresholdsConfig.model_validate(data)
    except ValidationError as err:
        raise ThresholdsError(_format_errors(err, name)) from None
    return ThresholdsFile(config, path, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_thresholds(path: str | os.PathLike[str]) -> ThresholdsFile:
    """Read and validate a thresholds file; ``sha256`` is over the file's bytes.

    Raises:
        FileNotFoundError: the file does not exist. ThresholdsError: anything invalid (file + key path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"thresholds file {path} does not exist (see examples/thresholds-paper.yaml for one to copy)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ThresholdsError(f"{path}: not UTF-8 text ({err})") from None
    loaded = parse_thresholds(text, str(path), path)
    return ThresholdsFile(loaded.config, path, text, hashlib.sha256(raw).hexdigest())


class _FlowList(list):
    """A list that ``dump_thresholds`` writes on one line: ``[0.031, 0.029, ...]``."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def dump_thresholds(config: ThresholdsConfig, header: str = "") -> str:
    """YAML text for ``config`` (null thresholds written out), preceded by ``header`` as ``#`` comments."""
    models = {}
    for name, model in config.models.items():
        entry: dict[str, Any] = {}
        if model.checkpoint is not None:
            entry["checkpoint"] = model.checkpoint
        if model.calibrated_for_sha256 is not None:
            entry["calibrated_for_sha256"] = model.calibrated_for_sha256
        entry["pa_mpjpe_max"] = model.pa_mpjpe_max
        entry["s_mpjpe_max"] = model.s_mpjpe_max
        entry["pck"] = model.pck.model_dump() if model.pck is not None else None
        entry["max_keypoint_error_max"] = model.max_keypoint_error_max
        if model.max_relative_keypoint_error is not None:
            relative = model.max_relative_keypoint_error
            # the 26 scales as a flow-style list (wrapped at 100 columns) rather than 26 lines
            entry["max_relative_keypoint_error"] = {
                "max": relative.max,
                "scales": _FlowList(relative.scales),
                "flip_weight": relative.flip_weight,
            }
        models[name] = entry
    body = yaml.dump(
        {"version": config.version, "combine": config.combine, "models": models},
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    text = comments + body
    parse_thresholds(text)  # what we write must load
    return text


def checkpoint_mismatches(
    config: ThresholdsConfig, hashes: dict[str, str]
) -> dict[str, tuple[str, str | None]]:
    """Model name -> (its ``calibrated_for_sha256``, ``hashes.get(name)``) for every model whose key is set
    and differs from the sha256 of the checkpoint that scores (or scored) it, in model order; a model
    missing from ``hashes`` differs. Models without the key pass."""
    out = {}
    for name, model in config.models.items():
        expected, actual = model.calibrated_for_sha256, hashes.get(name)
        if expected is not None and actual != expected:
            out[name] = (expected, actual)
    return out


def calibration_mismatches(thresholds: ThresholdsFile, hashes: dict[str, str]) -> list[str]:
    """``checkpoint_mismatches`` as one message per model, for the warning ``prf score`` gives."""
    where = thresholds.path or "the thresholds file"
    return [
        f"model {name}: {where} was calibrated for checkpoint sha256 {expected[:12]}... "
        f"(models.{name}.calibrated_for_sha256) but the checkpoint given has sha256 "
        f"{str(actual)[:12]}...; its verdicts may mean little. Calibrate thresholds for this checkpoint "
        "(prf calibrate), or delete the key to use them anyway"
        for name, (expected, actual) in checkpoint_mismatches(thresholds.config, hashes).items()
    ]
