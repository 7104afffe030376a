"""Referring-segmentation metrics as GRES defines them (SPEC section 5).

Every sample contributes a binary mask and a binary no-target decision. From
those come two integers per sample, I and U, and from the per-sample arrays
all the reported numbers:

    ground truth  prediction  I, U added to cIoU    gIoU counts       Pr_X
    ------------  ----------  --------------------  ----------------  ------------
    no-target     no-target   0, 0                  1.0               not counted
    no-target     target      0, area(pred)         0.0               not counted
    target        no-target   0, area(pred OR gt)   0.0               counted as 0
    target        target      area(pred AND gt),    I/U (0 if U = 0)  counted
                              area(pred OR gt)

- cIoU (overall IoU, oIoU) = sum I / sum U: dominated by large objects.
- gIoU (mean IoU) = mean of the per-sample IoU over all samples: every
  sample weighs the same, and a correct no-target call scores 1.
- Pr_X = share of targeted samples with IoU >= X. Named ``Pr_0.7`` rather
  than ``Pr@0.7`` because MLflow metric names may not contain '@'.
- N_acc = correct no-target calls / no-target samples; T_acc = targeted
  samples not rejected / targeted samples (0.0 when the denominator is 0).

Papers mix cIoU and gIoU up (CRIS's "IoU" is a mean IoU), so both are always
reported. Arrays in, numbers out: this module does no I/O and imports only
numpy; the batch helper also accepts torch tensors without importing torch.

Shapes: B samples, H x W mask at the evaluation resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The GRES reference evaluator reports precision at these IoU thresholds.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to host.

    Duck-typed on ``.detach`` so that this module never imports torch.
    """
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _require_bool(name: str, x: Any) -> None:
    """Reject non-boolean masks (a uint8 255 mask or a probability map would
    silently give wrong counts under ``&`` and ``|``).

    The dtype is compared by name because numpy says ``bool`` and torch says
    ``torch.bool``, and this module does not import torch.
    """
    if str(x.dtype) not in ("bool", "torch.bool"):
        raise TypeError(f"{name} must be a boolean mask, got dtype {x.dtype}")


def _apply_table(
    inter: np.ndarray,
    union: np.ndarray,
    pred_area: np.ndarray,
    pred_nt: np.ndarray,
    gt_nt: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw mask counts into the I and U of the GRES table, per sample.

    Args:
        inter: (B,) |pred AND gt| of the masks as predicted.
        union: (B,) |pred OR gt|.
        pred_area: (B,) |pred|.
        pred_nt: (B,) bool, the model called the sample no-target.
        gt_nt: (B,) bool, the sample is a no-target expression.

    Returns:
        I, U: (B,) int64 each.
    """
    both_target = ~gt_nt & ~pred_nt
    # A no-target call forces I to 0 even if the mask overlaps the target.
    i = np.where(both_target, inter, 0)
    # A no-target sample has an empty gt, so its union is just the predicted
    # area; taking |pred| explicitly keeps the table exact even if a caller
    # hands a non-empty gt for it.
    u = np.where(gt_nt, np.where(pred_nt, 0, pred_area), union)
    return i.astype(np.int64), u.astype(np.int64)


def intersection_union(
    pred: np.ndarray, gt: np.ndarray, pred_nt: bool, gt_nt: bool
) -> tuple[int, int]:
    """The I and U one sample adds to cIoU (see the table in the module docstring).

    Args:
        pred: (H, W) bool predicted mask.
        gt: (H, W) bool ground-truth mask (the union of all targets; empty
            for a no-target expression).
        pred_nt: the model called this sample no-target.
        gt_nt: the expression refers to nothing in the image.

    Returns:
        (I, U) as Python ints.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must be equal (H, W) masks, got {pred.shape} and {gt.shape}")
    i, u = batch_intersection_union(pred[None], gt[None], [pred_nt], [gt_nt])
    return int(i[0]), int(u[0])


def batch_intersection_union(
    pred: Any, gt: Any, pred_nt: Any, gt_nt: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`intersection_union` over a stack of samples.

    Accepts numpy arrays or torch tensors. With tensors the pixel counts are
    reduced on the tensors' own device, so only B integers travel to the host
    rather than B x H x W booleans.

    Args:
        pred: (B, H, W) bool predicted masks.
        gt: (B, H, W) bool ground-truth masks.
        pred_nt: (B,) bool no-target decisions of the model.
        gt_nt: (B,) bool no-target flags of the expressions.

    Returns:
        I, U: (B,) int64 numpy arrays.
    """
    if not hasattr(pred, "detach"):
        pred = np.asarray(pred)
    if not hasattr(gt, "detach"):
        gt = np.asarray(gt)
    _require_bool("pred", pred)
    _require_bool("gt", gt)
    if len(pred.shape) != 3 or tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(
            f"pred and gt must be equal (B, H, W) stacks, got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    b = pred.shape[0]
    pred_nt = _to_numpy(pred_nt).astype(bool).reshape(-1)
    gt_nt = _to_numpy(gt_nt).astype(bool).reshape(-1)
    if pred_nt.shape != (b,) or gt_nt.shape != (b,):
        raise ValueError(
            f"pred_nt and gt_nt must have {b} entries, got {pred_nt.shape[0]} and {gt_nt.shape[0]}"
        )
    flat_pred = pred.reshape(b, -1)
    flat_gt = gt.reshape(b, -1)
    # `.sum(1)` means the same on numpy arrays and torch tensors (int64 for both).
    inter = _to_numpy((flat_pred & flat_gt).sum(1))
    union = _to_numpy((flat_pred | flat_gt).sum(1))
    pred_area = _to_numpy(flat_pred.sum(1))
    return _apply_table(inter, union, pred_area, pred_nt, gt_nt)


def _check_per_sample(
    i: Any, u: Any, gt_nt: Any, pred_nt: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coerce the four per-sample arrays to 1-D numpy and check they agree."""
    i = _to_numpy(i).reshape(-1).astype(np.float64)
    u = _to_numpy(u).reshape(-1).astype(np.float64)
    gt_nt = _to_numpy(gt_nt).reshape(-1).astype(bool)
    pred_nt = _to_numpy(pred_nt).reshape(-1).astype(bool)
    n = i.shape[0]
    if not (u.shape[0] == gt_nt.shape[0] == pred_nt.shape[0] == n):
        raise ValueError(
            "I, U, gt_nt and pred_nt must have one entry per sample, got "
            f"{i.shape[0]}, {u.shape[0]}, {gt_nt.shape[0]}, {pred_nt.shape[0]}"
        )
    if np.any(i < 0) or np.any(i > u):
        raise ValueError("every sample needs 0 <= I <= U")
    return i, u, gt_nt, pred_nt


def sample_iou(i: Any, u: Any, gt_nt: Any, pred_nt: Any) -> np.ndarray:
    """Per-sample IoU as gIoU counts it.

    Args:
        i: (B,) intersections from :func:`batch_intersection_union`.
        u: (B,) unions.
        gt_nt: (B,) bool no-target flags of the expressions.
        pred_nt: (B,) bool no-target decisions of the model.

    Returns:
        (B,) float64 in [0, 1]: 1.0 for a correct no-target call, 0.0 when
        exactly one of gt and prediction says no-target, otherwise I / U
        (0.0 when U = 0, i.e. empty gt and empty mask predicted as target).
    """
    i, u, gt_nt, pred_nt = _check_per_sample(i, u, gt_nt, pred_nt)
    both_target = ~gt_nt & ~pred_nt
    # Divide only where U > 0 so that no 0/0 warning or NaN is ever produced.
    ratio = np.divide(i, u, out=np.zeros_like(i), where=u > 0)
    return np.where(gt_nt & pred_nt, 1.0, np.where(both_target, ratio, 0.0))


def _share(numerator: int, denominator: int) -> float:
    """numerator / denominator, and 0.0 for an empty denominator as SPEC says."""
    return float(numerator) / float(denominator) if denominator > 0 else 0.0


def summarize(
    i: Any,
    u: Any,
    gt_nt: Any,
    pred_nt: Any,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, float]:
    """All headline numbers of one split (or one subset of it).

    Args:
        i: (B,) intersections from :func:`batch_intersection_union`.
        u: (B,) unions.
        gt_nt: (B,) bool no-target flags of the expressions.
        pred_nt: (B,) bool no-target decisions of the model.
        thresholds: IoU thresholds X for the ``Pr_X`` keys.

    Returns:
        Keys in this order: ``cIoU``, ``gIoU``, ``Pr_<X>`` per threshold
        (``Pr_0.5`` ... ``Pr_0.9`` by default), ``N_acc``, ``T_acc`` (floats),
        ``n_samples``, ``n_no_target`` (ints). Every ratio is 0.0 when its
        denominator is empty.
    """
    i, u, gt_nt, pred_nt = _check_per_sample(i, u, gt_nt, pred_nt)
    iou = sample_iou(i, u, gt_nt, pred_nt)
    targeted = ~gt_nt
    n = int(i.shape[0])
    n_nt = int(gt_nt.sum())
    n_t = n - n_nt

    out: dict[str, float] = {
        "cIoU": float(i.sum() / u.sum()) if u.sum() > 0 else 0.0,
        "gIoU": float(iou.mean()) if n > 0 else 0.0,
    }
    # sample_iou already scores a rejected targeted sample as 0, which is how
    # Pr_X must count it. No epsilon in the comparison: I / U is a correctly
    # rounded division, so a ratio exactly equal to X (2 / 4 vs 0.5, 7 / 10
    # vs 0.7) gives the same double as the literal X.
    for x in thresholds:
        out[f"Pr_{x:g}"] = _share(int((iou[targeted] >= x).sum()), n_t)
    out["N_acc"] = _share(int((gt_nt & pred_nt).sum()), n_nt)
    out["T_acc"] = _share(int((targeted & ~pred_nt).sum()), n_t)
    out["n_samples"] = n
    out["n_no_target"] = n_nt
    return out
