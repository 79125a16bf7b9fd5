"""Training losses of the four methods: Eq. 3 (heatmap/dark), Eq. 8 (udp), Eq. 14/15 (cal).

Every loss has the paper's form ``1/(NK) * sum_i sum_k [term_ik]``. How a per-joint
term is reduced over its map, and why:

- Each per-joint term is a **per-pixel mean** over its map (``h*w`` pixels for a
  heatmap, ``2*h*w`` values for an offset field). This is what the authors' code
  does (``nn.MSELoss``/``nn.L1Loss`` with ``reduction='mean'`` per joint, summed over
  joints and divided by K) and it keeps the heatmap and offset terms on comparable
  scales independent of the heatmap size, so ``alpha`` means the same at 64x48 and
  256x192.
- Joints whose weight is 0 (unlabelled, or outside the heatmap) contribute nothing:
  their term is multiplied by the weight. The denominator stays ``N*K`` as in the
  paper and the authors' code (a weight-0 joint counts as a zero term), so the loss
  scale does not jump with the number of labelled joints in a batch.
- The authors multiply their L2 heatmap term by 0.5; the paper's equations do not.
  We follow the equations and carry the factor into ``alpha`` (:data:`DEFAULT_ALPHA`).
  Their UDP loss halves both terms (``0.5 * MSE + 0.7 * 0.5 * SmoothL1``), which
  is ``alpha = 0.7`` in Eq. 8's form; their CAL loss (the version with the MGM)
  halves only the heatmap term (``0.5 * L2 + 0.7 * L1``), which is ``alpha = 1.4``
  in Eqs. 14/15's form. A common factor of the whole objective is what Adam
  ignores, so only the ratio of the two terms matters, and that ratio is kept.

Eq. 8 names a cross-entropy on the binary disk B. With one sigmoid unit per pixel
the cross-entropy of a binary target is the per-pixel binary cross-entropy, so the
``udp`` heatmap output is read as **logits** (``binary_cross_entropy_with_logits``,
numerically stable). The UDP reference code instead regresses the disk with MSE;
we keep the paper's formulation. ``argmax`` decoding is unaffected by the sigmoid.

The losses return ``(total, terms)`` where ``terms`` holds detached scalars:
``"heatmap"`` (the first bracketed term) and, for offset methods, ``"offset"`` (the
second term *before* multiplying by ``alpha``), so ``total = heatmap + alpha*offset``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cal_core.config import DEFAULT_ALPHA

METHODS = ("heatmap", "dark", "udp", "cal")

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise a ValueError naming ``name`` when ``tensor`` does not have ``shape``."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"loss input {name!r} has shape {tuple(tensor.shape)}, expected {shape}")


def _weighted_mean(per_joint: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``1/(NK) * sum_ik w_ik * per_joint_ik`` for per-joint terms of shape (N, K)."""
    return (per_joint * weights).sum() / per_joint.numel()


def _heatmap_inputs(outputs: dict, targets: dict, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fetch and shape-check the predicted and target heatmaps and the joint weights, as float32.

    Losses are always computed in float32, also under bf16/fp16 autocast, where a
    half-precision difference of nearly equal maps would lose most of its digits.
    """
    pred, target = outputs["heatmap"], targets["heatmap"]
    n, k, h, w = target.shape
    _check("outputs['heatmap']", pred, (n, k, h, w))
    _check("weights", weights, (n, k))
    return pred.float(), target.float(), weights.float()


def _offset_inputs(outputs: dict, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch and shape-check the predicted and target offset fields (N, K, 2, h, w)."""
    if "offset" not in outputs:
        raise ValueError("offset loss needs outputs['offset'] (N, K, 2, h, w): use an offset or dual head")
    pred, target = outputs["offset"], targets["offset"]
    n, k, _, h, w = target.shape
    _check("outputs['offset']", pred, (n, k, 2, h, w))
    return pred.float(), target.float()


def l2_heatmap_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 3 / first term of Eqs. 14-15: ``1/(NK) sum_ik w_ik * mean_p (C - C_hat)^2``."""
    per_joint = (pred - target).pow(2).mean(dim=(2, 3))
    return _weighted_mean(per_joint, weights)


def bce_disk_loss(logits: torch.Tensor, disk: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """First term of Eq. 8: per-pixel binary cross-entropy of the disk B, logits in, per-joint mean."""
    per_pixel = F.binary_cross_entropy_with_logits(logits, disk, reduction="none")
    return _weighted_mean(per_pixel.mean(dim=(2, 3)), weights)


def masked_offset_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       weights: torch.Tensor, smooth: bool) -> torch.Tensor:
    """Second term of Eqs. 8/14/15: ``1/(NK) sum_ik w_ik * mean_(c,p) mask(p) * l(O - O_hat)``.

    ``mask`` (N, K, h, w) is B for Eq. 8, G for Eq. 14 and the MGM m for Eq. 15; ``l`` is
    SmoothL1 (beta 1, Eq. 8) or L1 (Eqs. 14-15). The mean runs over both channels and
    all pixels (``2*h*w`` values), as the authors' ``L1Loss(reduction='mean')``.
    """
    per_value = F.smooth_l1_loss(pred, target, reduction="none") if smooth else (pred - target).abs()
    per_joint = (per_value * mask.unsqueeze(2)).mean(dim=(2, 3, 4))
    return _weighted_mean(per_joint, weights)


def _heatmap_method() -> LossFn:
    """Eq. 3: MSE between Gaussian target heatmaps and predictions (heatmap and dark)."""
    def loss(outputs: dict, targets: dict, weights: torch.Tensor, mgm: torch.Tensor | None = None):
        if mgm is not None:
            raise ValueError("the heatmap/dark loss (Eq. 3) takes no MGM mask")
        pred, target, w = _heatmap_inputs(outputs, targets, weights)
        term = l2_heatmap_loss(pred, target, w)
        return term, {"heatmap": term.detach()}
    return loss


def _udp_method(alpha: float) -> LossFn:
    """Eq. 8: CE on the binary disk B + alpha * SmoothL1 on the offsets inside B."""
    def loss(outputs: dict, targets: dict, weights: torch.Tensor, mgm: torch.Tensor | None = None):
        if mgm is not None:
            raise ValueError("the udp loss (Eq. 8) takes no MGM mask")
        logits, disk, w = _heatmap_inputs(outputs, targets, weights)  # the udp heatmap target is B
        pred_o, target_o = _offset_inputs(outputs, targets)
        heat = bce_disk_loss(logits, disk, w)
        off = masked_offset_loss(pred_o, target_o, disk, w, smooth=True)
        return heat + alpha * off, {"heatmap": heat.detach(), "offset": off.detach()}
    return loss


def _cal_method(alpha: float, stage: int) -> LossFn:
    """Eq. 14 (stage 1: offsets weighted by G) or Eq. 15 (stage 2: weighted by the MGM m)."""
    def loss(outputs: dict, targets: dict, weights: torch.Tensor, mgm: torch.Tensor | None = None):
        pred_g, target_g, w = _heatmap_inputs(outputs, targets, weights)
        pred_o, target_o = _offset_inputs(outputs, targets)
        if stage == 1:
            if mgm is not None:
                raise ValueError("cal stage 1 (Eq. 14) weights offsets by G and takes no MGM mask")
            mask = target_g
        else:
            if mgm is None:
                raise ValueError("cal stage 2 (Eq. 15) needs the MGM masks `mgm` (N, K, h, w)")
            _check("mgm", mgm, tuple(target_g.shape))
            mask = mgm.float()
        heat = l2_heatmap_loss(pred_g, target_g, w)
        off = masked_offset_loss(pred_o, target_o, mask, w, smooth=False)
        return heat + alpha * off, {"heatmap": heat.detach(), "offset": off.detach()}
    return loss


def build_loss(method: str, stage: int = 1, alpha: float | None = None) -> LossFn:
    """Return ``loss(outputs, targets, weights, mgm=None) -> (total, terms)`` for ``method``.

    ``outputs``/``targets`` are the dicts of the model and the codec (see
    docs/architecture.md); ``weights`` is (N, K). ``stage`` only matters for ``cal``;
    ``alpha`` (offset methods) defaults to the method's :data:`DEFAULT_ALPHA`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if stage == 2 and method != "cal":
        raise ValueError(f"stage 2 (Eq. 15) exists only for method 'cal', not {method!r}")
    if method in ("heatmap", "dark"):
        return _heatmap_method()
    alpha = DEFAULT_ALPHA[method] if alpha is None else alpha
    if method == "udp":
        return _udp_method(alpha)
    return _cal_method(alpha, stage)
