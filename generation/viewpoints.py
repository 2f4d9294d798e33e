"""Seeded viewpoint sampling, as 3D-DST does it, configurable per category.

Azimuth is uniform over the circle; elevation and in-plane theta are truncated Gaussians; the distance is
uniform over a range. Angles are configured in degrees (what people write in YAML) and returned in radians.
Conventions of the angles are those of `prf.geometry.look_at` (azimuth 0 = camera in front of the animal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.stats import truncnorm


class TruncatedGaussian(BaseModel):
    """A normal distribution N(mean, std) truncated to [low, high] (degrees)."""

    model_config = ConfigDict(extra="forbid")
    mean: float = 0.0
    std: float = Field(default=10.0, ge=0.0)
    low: float = -90.0
    high: float = 90.0

    @model_validator(mode="after")
    def _check_bounds(self) -> TruncatedGaussian:
        if not self.low <= self.mean <= self.high:
            raise ValueError(f"mean {self.mean} must lie in [low, high] = [{self.low}, {self.high}]")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) samples in degrees."""
        if self.std == 0.0:
            return np.full(n, self.mean)
        a, b = (self.low - self.mean) / self.std, (self.high - self.mean) / self.std
        return truncnorm.rvs(a, b, loc=self.mean, scale=self.std, size=n, random_state=rng)


class ViewpointConfig(BaseModel):
    """Viewpoint distribution of one category. Defaults follow 3D-DST, adjusted for a ~1 m animal.

    `distance` is the camera distance in metres from the animal's centre, uniform in [min, max].
    """

    model_config = ConfigDict(extra="forbid")
    azimuth_range: tuple[float, float] = (0.0, 360.0)
    elevation: TruncatedGaussian = TruncatedGaussian(mean=15.0, std=15.0, low=-10.0, high=60.0)
    theta: TruncatedGaussian = TruncatedGaussian(mean=0.0, std=5.0, low=-15.0, high=15.0)
    distance: tuple[float, float] = (1.9, 2.5)

    @model_validator(mode="after")
    def _check_ranges(self) -> ViewpointConfig:
        lo, hi = self.distance
        if not 0.0 < lo <= hi:
            raise ValueError(f"distance must satisfy 0 < min <= max, got {self.distance}")
        if self.azimuth_range[0] > self.azimuth_range[1]:
            raise ValueError(f"azimuth_range must be increasing, got {self.azimuth_range}")
        return self


@dataclass(frozen=True)
class Viewpoints:
    """N sampled viewpoints: azimuth, elevation, theta in radians, distance in metres, each (N,)."""

    azimuth: np.ndarray
    elevation: np.ndarray
    theta: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return int(self.azimuth.shape[0])

    def row(self, i: int) -> dict[str, float]:
        return {
            "azimuth": float(self.azimuth[i]),
            "elevation": float(self.elevation[i]),
            "theta": float(self.theta[i]),
            "distance": float(self.distance[i]),
        }


def sample_viewpoints(config: ViewpointConfig, n: int, rng: np.random.Generator) -> Viewpoints:
    """Draw n viewpoints from `config` with the given generator (deterministic for a seeded generator)."""
    az = rng.uniform(*config.azimuth_range, size=n)
    el = config.elevation.sample(rng, n)
    th = config.theta.sample(rng, n)
    dist = rng.uniform(*config.distance, size=n)
    return Viewpoints(
        azimuth=np.deg2rad(np.mod(az, 360.0)),
        elevation=np.deg2rad(el),
        theta=np.deg2rad(th),
        distance=dist,
    )
