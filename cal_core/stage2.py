"""CAL stage 2 (paper §4.3): where the Mixed Gaussian Masks come from and what is trained.

- :class:`MaskMaker` gives the MGMs ``m`` of Eq. 15 for each mini-batch:
  ``static`` places the mixture of ``gmm.json`` (fitted over the training set
  by ``cal-pose fit-gmm``) at every joint; ``batch`` refits the mixture on the
  mini-batch's own displacements by EM, warm-started from the previous batch
  (first from ``gmm.json``), on the training device (Alg. 1); under DDP the
  displacements of the whole global mini-batch (all ranks), so the ranks
  keep one mixture.
- :func:`trainable_parameters` selects what stage 2 optimises: the whole net
  (``all``) or only the parameters that do not reach the heatmap output
  (``offset``: the offset branch, as the authors' offset fine-tuning does).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from cal_core import mgm, storage


class MaskMaker:
    """MGMs (N, K, h, w) for a batch, from a fixed mixture or refitted per batch (Alg. 1)."""

    def __init__(self, params: mgm.GMMParams, mode: str, radius: float, heatmap_size: tuple[int, int],
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``gather`` (DDP, ``batch`` mode): displacements of all ranks, so every rank refits one mixture."""
        if mode not in ("static", "batch"):
            raise ValueError(f"mgm update must be 'static' or 'batch', got {mode!r}")
        self.params, self.mode = params, mode
        self.radius = float(radius)
        self.heatmap_size = heatmap_size
        self.gather = gather

    @classmethod
    def from_uri(cls, uri: str, mode: str, radius: float, heatmap_size: tuple[int, int],
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> MaskMaker:
        """Read the mixture of a ``gmm.json`` written by ``cal-pose fit-gmm`` (local or s3://).

        Displacements are in heatmap pixels, so a mixture fitted at another
        heatmap size (another input size) is refused when the file records it.
        """
        try:
            data = json.loads(storage.read_bytes(uri))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the GMM file {uri}: {exc}") from exc
        fitted = data.get("heatmap_size") if isinstance(data, dict) else None
        if fitted is not None and [int(v) for v in fitted] != [int(v) for v in heatmap_size]:
            raise ValueError(f"{uri} was fitted on {fitted[0]}x{fitted[1]} heatmaps (input "
                             f"{data.get('input_size')}); this model's heatmaps are "
                             f"{heatmap_size[0]}x{heatmap_size[1]}: fit-gmm on the same input size")
        return cls(mgm.GMMParams.from_dict(data, source=uri), mode, radius, heatmap_size, gather)

    @torch.no_grad()
    def __call__(self, heatmap: torch.Tensor, joints_hm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 13 masks for this batch; ``batch`` mode also updates the mixture (warm start)."""
        device = heatmap.device
        if self.mode == "static":
            return mgm.place_masks(self.params.to(device), joints_hm, self.heatmap_size, self.radius)
        masks, self.params = mgm.batch_masks(heatmap.detach().float(), joints_hm, weights,
                                             self.params.to(device), self.radius, gather=self.gather)
        return masks


def offset_only_parameters(model: nn.Module, input_size: tuple[int, int]) -> set[str]:
    """Names of the parameters the heatmap output does not depend on (the offset branch).

    Found from the autograd graph of one forward pass (``allow_unused``): exact
    for any architecture, no naming convention assumed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    device = named[0][1].device if named else torch.device("cpu")
    try:
        out = model(torch.zeros(1, 3, *input_size, device=device))
        grads = torch.autograd.grad(out["heatmap"].sum(), [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
    return {name for (name, _), grad in zip(named, grads, strict=True) if grad is None}


def trainable_parameters(model: nn.Module, mode: str, input_size: tuple[int, int]) -> list[nn.Parameter]:
    """Parameters stage 2 optimises; with ``offset`` the rest is frozen (``requires_grad=False``)."""
    if mode == "all":
        return [p for p in model.parameters() if p.requires_grad]
    if mode != "offset":
        raise ValueError(f"stage-2 training mode must be 'all' or 'offset', got {mode!r}")
    keep = offset_only_parameters(model, input_size)
    if not keep:
        raise ValueError("stage2_train='offset' but the model has no parameters outside the heatmap path")
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return [p for n, p in model.named_parameters() if n in keep]


def freeze_frozen_norms(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode (fixed running stats).

    Without this, stage-2 ``offset`` training would still move the frozen
    trunk's BatchNorm statistics and so the heatmaps it was meant to keep.
    """
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._NormBase) and params \
                and not any(p.requires_grad for p in params):
            module.eval()
