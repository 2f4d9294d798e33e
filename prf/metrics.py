"""Pose-quality metrics, batched in torch: MPJPE, PA-MPJPE, S-MPJPE, PCK, rotation geodesic, top-k errors.

Shape legend: B batch, N keypoints, D point dimension (3 for 3D keypoints, 2 for image keypoints).

Units: every distance metric returns the unit of its inputs. Keypoints in SMAL units (about metres) are
reported in "mm" by the caller multiplying both inputs by 1000 first. PCK is a share in [0, 1] (the paper's
threshold 95.83 is in %, i.e. 0.9583 here). Angles are radians.

Degenerate rows: a row whose input contains NaN/inf (in a keypoint that counts), is all zeros, or cannot be
aligned (no spread for the Procrustes / scale fit, no visible keypoint, a non-positive normaliser) gets NaN
in the output for that row only. Nothing is computed per row in Python and nothing raises mid-batch: such
rows are replaced by a harmless stand-in before any SVD / eigen-solver, and masked to NaN afterwards.
"""

from __future__ import annotations

import roma
import torch
from torch import Tensor

from prf.body.layout import ROOT_KEYPOINT

__all__ = [
    "bbox_normalizer",
    "mask_area_normalizer",
    "max_keypoint_error",
    "mpjpe",
    "pa_aligned",
    "pa_mpjpe",
    "pck",
    "per_keypoint_errors",
    "rotation_geodesic",
    "s_mpjpe",
    "topk_mean_error",
]


def _check_points(name: str, x: Tensor, dims: tuple[int, ...] = (2, 3)) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] not in dims:
        raise ValueError(
            f"{name} must have shape (B, N, D) with D in {dims}, got {tuple(x.shape)}; "
            "add a batch dimension with x[None] for a single sample"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; use x.float()")


def _check_pair(pred: Tensor, target: Tensor, dims: tuple[int, ...] = (2, 3)) -> None:
    _check_points("pred", pred, dims)
    _check_points("target", target, dims)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")


def _check_shape(name: str, x: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} to match the keypoints, got {tuple(x.shape)}"
        )


def _bad_rows(*xs: Tensor) -> Tensor:
    """(B,) bool: some input row holds a non-finite value or is all zeros."""
    bad = torch.zeros(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        flat = x.reshape(x.shape[0], -1)
        bad |= ~torch.isfinite(flat).all(dim=1) | (flat == 0).all(dim=1)
    return bad


def _all_zero(*xs: Tensor) -> Tensor:
    """(B,) bool: some input row is all zeros (a missing annotation or prediction)."""
    bad = torch.zeros(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        bad |= (x.reshape(x.shape[0], -1) == 0).all(dim=1)
    return bad


def _no_spread(x: Tensor) -> Tensor:
    """(B,) bool: the points of a row (B, N, D) all sit at one place (up to round-off), or hold NaN/inf."""
    safe = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    spread = (safe - safe.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    return spread <= (256 * torch.finfo(x.dtype).eps) ** 2 * safe.pow(2).sum(dim=(1, 2))


def _nan_where(bad: Tensor, value: Tensor) -> Tensor:
    """Set the rows of `value` (leading dim B) flagged in `bad` (B,) to NaN."""
    shape = (-1,) + (1,) * (value.dim() - 1)
    return torch.where(bad.reshape(shape), torch.full_like(value, float("nan")), value)


def _sanitise(bad: Tensor, x: Tensor, stand_in: Tensor) -> Tensor:
    """Replace the rows of x (B, ...) flagged in bad (B,) with stand_in (broadcastable to one row)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(bad.reshape(shape), stand_in.to(x).expand_as(x), x)


def _stand_in_points(n: int, d: int, device: torch.device) -> Tensor:
    """(N, D) a fixed, well-spread, non-planar point set used in place of degenerate rows."""
    i = torch.arange(n, device=device, dtype=torch.float64)
    cols = [torch.cos(1.3 * i + k) * (k + 1) + 0.1 * i for k in range(d)]
    return torch.stack(cols, dim=-1)


def per_keypoint_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Euclidean distance per keypoint, e_bn = ||pred_bn - target_bn||.

    Args:
        pred, target: (B, N, D), D in {2, 3}, one unit (pixels, metres or "mm").
    Returns:
        (B, N) in the input unit; rows that are all zero or hold NaN/inf anywhere are all NaN.
    """
    _check_pair(pred, target)
    return _nan_where(_bad_rows(pred, target), torch.linalg.vector_norm(pred - target, dim=-1))


def mpjpe(
    pred: Tensor, target: Tensor, root: int | None = ROOT_KEYPOINT, weights: Tensor | None = None
) -> Tensor:
    """Mean per-joint position error after root alignment.

    MPJPE_b = sum_n w_bn ||(p_bn - p_b,root) - (t_bn - t_b,root)|| / sum_n w_bn, with w = 1 by default.

    Args:
        pred, target: (B, N, 3) (or (B, N, 2)) in one unit; x1000 of metres gives "mm".
        root: keypoint subtracted from each set before comparing (Animal3D tail base = 7);
            None compares the raw coordinates.
        weights: optional (B, N) or (N,) non-negative per-keypoint weights (e.g. visibility).
    Returns:
        (B,) in the input unit; NaN for degenerate rows and rows whose weights sum to 0.
    """
    _check_pair(pred, target)
    n = pred.shape[1]
    if root is not None and not -n <= root < n:
        raise ValueError(f"root={root} is out of range for {n} keypoints; pass a valid index or root=None")
    zero_rows = _all_zero(pred, target)
    if root is not None:
        pred = pred - pred[:, root : root + 1]
        target = target - target[:, root : root + 1]
    err = torch.linalg.vector_norm(pred - target, dim=-1)
    if weights is None:
        w = torch.ones_like(err)
    else:
        w = torch.as_tensor(weights, dtype=err.dtype, device=err.device)
        if w.shape != (n,):
            _check_shape("weights", w, err.shape)
        w = w.expand_as(err)
    counted = w != 0
    total = w.sum(dim=1)
    bad = zero_rows | ~(counted <= torch.isfinite(err) & torch.isfinite(w)).all(dim=1)
    bad |= ~(total > 0)
    err = torch.where(counted, err, torch.zeros_like(err))  # a NaN at an ignored keypoint must not leak
    return _nan_where(bad, (w * err).sum(dim=1) / torch.where(bad, torch.ones_like(total), total))


def pa_aligned(pred: Tensor, target: Tensor) -> Tensor:
    """Procrustes-aligned prediction: s R p + t with the best similarity transform (Umeyama).

    (s, R, t) = argmin sum_n ||s R p_n + t - t_n||^2 with R a proper rotation (det R = +1: a mirrored
    prediction is not "explained away" by a reflection), s > 0 a scale, t a translation. Solved with
    `roma.rigid_points_registration(compute_scaling=True)` (centroids, Horn/SVD with the sign correction).

    Args:
        pred, target: (B, N, 3) in one unit, N >= 3.
    Returns:
        (B, N, 3) the aligned prediction in the target's unit and frame; NaN rows where a row is degenerate
        (NaN/inf, all zeros, or all points at one place so no rotation/scale can be fitted).
    """
    _check_pair(pred, target, dims=(3,))
    n = pred.shape[1]
    bad = _bad_rows(pred, target)
    bad = bad | _no_spread(pred) | _no_spread(target)
    stand_in = _stand_in_points(n, 3, pred.device)
    p = _sanitise(bad, pred, stand_in)
    q = _sanitise(bad, target, stand_in)
    R, t, s = roma.rigid_points_registration(p, q, compute_scaling=True)
    aligned = s[:, None, None] * torch.einsum("bij,bnj->bni", R, p) + t[:, None, :]
    return _nan_where(bad, aligned)


def pa_mpjpe(pred: Tensor, target: Tensor) -> Tensor:
    """Procrustes-aligned MPJPE: mean_n ||(s R p_n + t) - t_n|| with (s, R, t) from `pa_aligned`.

    Invariant to any similarity transform of the prediction (rotation, positive scale, translation), so it
    only measures articulation / shape; it is not invariant to a mirror image.

    Args:
        pred, target: (B, N, 3) in one unit (x1000 of metres gives "mm").
    Returns:
        (B,) in the target's unit; NaN for degenerate rows.
    """
    return torch.linalg.vector_norm(pa_aligned(pred, target) - target, dim=-1).mean(dim=1)


def s_mpjpe(pred: Tensor, target: Tensor) -> Tensor:
    """Scale-aligned MPJPE (our definition; the paper's exact one is unpublished).

    With centred sets p'_n = p_n - mean(p) and t'_n = t_n - mean(t), the least-squares scale
    s = <p', t'> / <p', p'> (sums over all keypoints and coordinates, no rotation) gives
    S-MPJPE = mean_n ||s p'_n - t'_n||.

    It removes translation and size only, so it still sees orientation errors: a prediction turned the wrong
    way scores high even when its articulation is right. Note that s is not constrained to be positive:
    for predictions turned by more than about 90 degrees s < 0 (the fit then mirrors through the centroid).

    Args:
        pred, target: (B, N, 3) (or (B, N, 2)) in one unit (x1000 of metres gives "mm").
    Returns:
        (B,) in the target's unit; NaN for degenerate rows (NaN/inf, all zeros, or a prediction whose
        points all coincide).
    """
    _check_pair(pred, target)
    bad = _bad_rows(pred, target)
    p = pred - pred.mean(dim=1, keepdim=True)
    q = target - target.mean(dim=1, keepdim=True)
    pp = p.pow(2).sum(dim=(1, 2))
    bad = bad | _no_spread(pred)
    s = (p * q).sum(dim=(1, 2)) / torch.where(bad, torch.ones_like(pp), pp)
    err = torch.linalg.vector_norm(s[:, None, None] * p - q, dim=-1).mean(dim=1)
    return _nan_where(bad, err)


def mask_area_normalizer(mask_area: Tensor) -> Tensor:
    """PCK normaliser sqrt(A) from the animal's silhouette area A in pixels^2 (Animal3D / BARC style).

    sqrt(area) follows the animal's size but not its aspect ratio or pose extent (a long tail or a
    stretched leg does not loosen the threshold), which is why it is the default for animals.

    Args:
        mask_area: (B,) silhouette areas in pixels^2.
    Returns:
        (B,) in pixels; NaN where the area is not positive (an empty mask) or not finite.
    """
    area = torch.as_tensor(mask_area)
    area = area.to(torch.get_default_dtype()) if not area.is_floating_point() else area
    if area.dim() != 1:
        raise ValueError(f"mask_area must have shape (B,), got {tuple(area.shape)}")
    ok = torch.isfinite(area) & (area > 0)
    return torch.where(ok, torch.sqrt(area.clamp_min(0)), torch.full_like(area, float("nan")))


def bbox_normalizer(bbox: Tensor) -> Tensor:
    """PCK normaliser max(w, h) from an (x, y, w, h) box in pixels (the common bbox-size alternative).

    The longer side is used so that a thin box (an animal seen from the front) still gives a threshold
    of the animal's size; it is larger than sqrt(area) for the same animal, so thresholds are not shared.

    Args:
        bbox: (B, 4) boxes as x, y, w, h in pixels.
    Returns:
        (B,) in pixels; NaN where w or h is not positive or not finite.
    """
    box = torch.as_tensor(bbox)
    box = box.to(torch.get_default_dtype()) if not box.is_floating_point() else box
    if box.dim() != 2 or box.shape[1] != 4:
        raise ValueError(f"bbox must have shape (B, 4) as x, y, w, h, got {tuple(box.shape)}")
    w, h = box[:, 2], box[:, 3]
    ok = torch.isfinite(w) & torch.isfinite(h) & (w > 0) & (h > 0)
    return torch.where(ok, torch.maximum(w, h), torch.full_like(w, float("nan")))


def pck(pred2d: Tensor, target2d: Tensor, visibility: Tensor, alpha: float, normalizer: Tensor) -> Tensor:
    """Percentage of correct keypoints: share of visible keypoints with ||p_n - t_n|| < alpha * norm_b.

    PCK_b = #{n visible : ||p_bn - t_bn|| < alpha * normalizer_b} / #{n visible}, a share in [0, 1].

    Args:
        pred2d, target2d: (B, N, 2) keypoints in pixels.
        visibility: (B, N) bool or numbers; a keypoint counts where visibility > 0.
        alpha: threshold factor (0.10 and 0.15 are common).
        normalizer: (B,) pixels, e.g. `mask_area_normalizer` or `bbox_normalizer`.
    Returns:
        (B,) share in [0, 1]; NaN where no keypoint is visible, the normaliser is not a positive finite
        number, a visible keypoint holds NaN/inf, or a row is all zeros. Invisible keypoints are ignored
        entirely (they may hold NaN).
    """
    _check_pair(pred2d, target2d, dims=(2,))
    vis = torch.as_tensor(visibility, device=pred2d.device)
    _check_shape("visibility", vis, pred2d.shape[:2])
    vis = vis > 0
    norm = torch.as_tensor(normalizer, dtype=pred2d.dtype, device=pred2d.device)
    _check_shape("normalizer", norm, pred2d.shape[:1])
    finite = torch.isfinite(pred2d).all(dim=-1) & torch.isfinite(target2d).all(dim=-1)
    zero = torch.zeros_like(pred2d)
    p = torch.where(vis[..., None], pred2d, zero)
    q = torch.where(vis[..., None], target2d, zero)
    count = vis.sum(dim=1)
    bad = (count == 0) | ~(vis <= finite).all(dim=1) | ~torch.isfinite(norm) | ~(norm > 0)
    bad |= _all_zero(pred2d, target2d)
    err = torch.linalg.vector_norm(torch.where(finite[..., None], p - q, zero), dim=-1)
    hit = (err < alpha * norm[:, None]) & vis
    share = hit.sum(dim=1).to(pred2d.dtype) / count.clamp_min(1).to(pred2d.dtype)
    return _nan_where(bad, share)


def rotation_geodesic(R_pred: Tensor, R_gt: Tensor) -> Tensor:
    """Geodesic angle between rotations: the angle of M = R_pred^T R_gt, in radians in [0, pi].

    angle = atan2(|vee(M - M^T)| / 2, clamp((tr M - 1) / 2, -1, 1)): the sine part keeps precision near 0
    and the cosine part near pi, where arccos alone loses half the digits.

    Args:
        R_pred, R_gt: (B, 3, 3) rotation matrices.
    Returns:
        (B,) radians in [0, pi]; NaN where a matrix holds NaN/inf or is all zeros.
    """
    for name, R in (("R_pred", R_pred), ("R_gt", R_gt)):
        if R.dim() != 3 or R.shape[1:] != (3, 3):
            raise ValueError(f"{name} must have shape (B, 3, 3), got {tuple(R.shape)}")
    if R_pred.shape != R_gt.shape:
        raise ValueError(f"R_pred {tuple(R_pred.shape)} and R_gt {tuple(R_gt.shape)} must match")
    M = R_pred.transpose(1, 2) @ R_gt
    cos = ((M.diagonal(dim1=1, dim2=2).sum(dim=1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    axis = torch.stack([M[:, 2, 1] - M[:, 1, 2], M[:, 0, 2] - M[:, 2, 0], M[:, 1, 0] - M[:, 0, 1]], dim=1)
    sin = torch.linalg.vector_norm(axis, dim=1) / 2.0
    return _nan_where(_bad_rows(R_pred, R_gt), torch.atan2(sin, cos))


def topk_mean_error(pred: Tensor, target: Tensor, k: int, visibility: Tensor | None = None) -> Tensor:
    """Mean of the k largest per-keypoint errors: a score that reacts to one misplaced limb.

    A mean over all N keypoints dilutes a wrong leg (2-4 keypoints) to the size of the model's own noise;
    the top-k mean (k about 3) does not.

    Args:
        pred, target: (B, N, D) in one unit (pixels, or "mm").
        k: how many of the largest errors to average, 1 <= k <= N.
        visibility: optional (B, N); keypoints with visibility <= 0 are ignored (a row with fewer than k
            visible keypoints averages the ones it has).
    Returns:
        (B,) in the input unit; NaN for degenerate rows (NaN/inf in a counted keypoint, all zeros, or no
        visible keypoint).
    """
    _check_pair(pred, target)
    n = pred.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    err = torch.linalg.vector_norm(pred - target, dim=-1)
    if visibility is None:
        vis = torch.ones_like(err, dtype=torch.bool)
    else:
        vis = torch.as_tensor(visibility, device=err.device)
        _check_shape("visibility", vis, err.shape)
        vis = vis > 0
    bad = _all_zero(pred, target) | ~(vis <= torch.isfinite(err)).all(dim=1) | ~vis.any(dim=1)
    ranked = torch.where(vis & torch.isfinite(err), err, torch.full_like(err, -1.0))
    top = ranked.topk(k, dim=1).values
    counted = top >= 0
    mean = (top * counted).sum(dim=1) / counted.sum(dim=1).clamp_min(1).to(err.dtype)
    return _nan_where(bad, mean)


def max_keypoint_error(pred: Tensor, target: Tensor, visibility: Tensor | None = None) -> Tensor:
    """Largest per-keypoint error max_n ||p_n - t_n||: `topk_mean_error` with k = 1. (B, N, D) -> (B,)."""
    return topk_mean_error(pred, target, 1, visibility)
