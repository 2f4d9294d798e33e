"""6D rotation representation used by the regressor heads (Zhou et al. 2019, as in PARE / SPIN).

Convention: a 6D vector ``d`` is the first two COLUMNS of a rotation matrix, stored row-major as a (3, 2)
matrix, i.e. ``d.reshape(3, 2) == R[:, :2]``. The identity is therefore ``(1, 0, 0, 1, 0, 0)``.
The conversion back to a rotation is Gram-Schmidt on those two columns (roma's ``special_gramschmidt``).

Shape legend: ``...`` any leading batch dimensions.
"""

from __future__ import annotations

import roma
import torch

IDENTITY_6D: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)

_EPS = 1e-8


def sixd_to_rotmat(d6: torch.Tensor) -> torch.Tensor:
    """(..., 6) 6D rotations -> (..., 3, 3) proper rotation matrices (Gram-Schmidt, differentiable)."""
    if d6.shape[-1] != 6:
        raise ValueError(f"expected a (..., 6) tensor of 6D rotations, got shape {tuple(d6.shape)}")
    columns = d6.reshape(*d6.shape[:-1], 3, 2)
    return roma.special_gramschmidt(columns, epsilon=_EPS)


def rotmat_to_sixd(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 6) 6D vectors (their first two columns, row-major)."""
    if rotmat.shape[-2:] != (3, 3):
        raise ValueError(
            f"expected a (..., 3, 3) tensor of rotation matrices, got shape {tuple(rotmat.shape)}"
        )
    return rotmat[..., :, :2].reshape(*rotmat.shape[:-2], 6)


def identity_6d(num_joints: int) -> torch.Tensor:
    """(J, 6) identity rotations in the 6D convention above."""
    return torch.tensor(IDENTITY_6D, dtype=torch.float32).expand(num_joints, 6).clone()
