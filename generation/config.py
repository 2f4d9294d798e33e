"""Generation settings: categories and the resolved configuration of one `prf generate` run.

Everything is validated before any image is made: unknown keys, wrong types and impossible values are
errors that name the key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from generation.failures import FAILURE_TYPES
from generation.viewpoints import ViewpointConfig


class CategoryConfig(BaseModel):
    """One animal category: its prompt name, ids, shape distribution and viewpoint distribution."""

    model_config = ConfigDict(extra="forbid")
    name: str
    prompt_name: str
    category_id: int = Field(ge=0)
    supercategory: int = Field(ge=0)
    beta_mean: list[float] = Field(default_factory=list)
    beta_std: float = Field(default=0.35, ge=0.0)
    viewpoint: ViewpointConfig = ViewpointConfig()


class CategoryTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categories: list[CategoryConfig]

    @model_validator(mode="after")
    def _unique(self) -> CategoryTable:
        names = [c.name for c in self.categories]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate category names: {dupes}")
        return self

    def by_name(self, name: str) -> CategoryConfig:
        for c in self.categories:
            if c.name == name:
                return c
        raise ValueError(f"unknown category {name!r}; known: {', '.join(c.name for c in self.categories)}")


def load_category_table(path: str | Path | None = None) -> CategoryTable:
    """The category table from a YAML file, or the built-in one (generation/configs/categories.yaml)."""
    if path is None:
        text = resources.files("generation").joinpath("configs/categories.yaml").read_text()
        source = "generation/configs/categories.yaml"
    else:
        source = str(path)
        text = Path(path).read_text()
    try:
        return CategoryTable.model_validate(yaml.safe_load(text))
    except Exception as exc:  # pydantic's message names the key; add the file
        raise ValueError(f"{source}: invalid category table: {exc}") from exc


Style = Literal["synthetic", "standin"]
DEFAULT_FOCAL_FACTOR = 1.09375  # 3D-DST: a 35 mm lens on a 32 mm sensor


class GenerationConfig(BaseModel):
    """The resolved settings of one generation run (saved in batch.json).

    image_size: output image side in pixels (square images). focal_factor: focal length in units of the
    image width (3D-DST's 35 mm lens on a 32 mm sensor gives 1.09375). focal_px: an absolute focal length
    in pixels instead (the stand-in "real" set uses 1000 px, as Animal3D users assume); camera distances
    are scaled with the focal length so the animal keeps its size in the frame.
    inject_failures: fraction of images rendered from a perturbed state (0 = off).
    """

    model_config = ConfigDict(extra="forbid")
    n: int = Field(gt=0)
    seed: int = 0
    image_size: int = Field(default=256, ge=32, le=2048)
    backend: str = "render"
    backend_options: dict[str, object] = Field(default_factory=dict)
    categories: list[str] = Field(default_factory=list)
    category_table: str | None = None
    inject_failures: float = Field(default=0.0, ge=0.0, le=1.0)
    failure_types: list[str] = Field(default_factory=lambda: list(FAILURE_TYPES))
    severity_range: tuple[float, float] = (0.3, 1.0)
    smal: str | None = None
    family_data: str | None = None
    poses: str | None = None
    pose_config: str | None = None
    style: Style = "synthetic"
    background_dir: str | None = None
    focal_factor: float = Field(default=DEFAULT_FOCAL_FACTOR, gt=0.0)
    focal_px: float | None = Field(default=None, gt=0.0)
    condition_short_side: int | None = None
    image_format: Literal["png", "jpg"] = "png"

    @field_validator("failure_types")
    @classmethod
    def _known_failures(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in FAILURE_TYPES]
        if unknown:
            raise ValueError(f"unknown failure types {unknown}; choose from {list(FAILURE_TYPES)}")
        if not value:
            raise ValueError("failure_types must not be empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        lo, hi = self.severity_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"severity_range must satisfy 0 <= low <= high <= 1, got {self.severity_range}")
        if self.family_data is not None and self.smal is None:
            raise ValueError("family_data is the shape-family file of a SMAL model: give smal (--smal) too")
        if self.backend != "render" and (self.style != "synthetic" or self.background_dir is not None):
            raise ValueError(
                "style and background_dir choose the render backend's look; the "
                f"{self.backend} backend makes its own (leave them out)"
            )
        for key in ("smal", "family_data", "poses", "pose_config", "category_table", "background_dir"):
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                raise ValueError(f"{key}: path does not exist: {value}")
        return self

    def focal_length(self) -> float:
        """Focal length in pixels."""
        return self.focal_px if self.focal_px is not None else self.focal_factor * self.image_size

    def distance_scale(self) -> float:
        """Factor applied to the configured camera distances (1 at 3D-DST's lens)."""
        return self.focal_length() / (DEFAULT_FOCAL_FACTOR * self.image_size)

    def resolved_condition_side(self) -> int:
        """Short side of the Canny condition: a multiple of 64, at least 64 (3D-DST uses 512)."""
        side = self.condition_short_side or self.image_size
        return max(64, round(side / 64.0) * 64)
