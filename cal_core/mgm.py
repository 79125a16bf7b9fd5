"""Mixed Gaussian Masks (paper Alg. 1, Eqs. 11-13): the stage-2 offset-loss weights.

Pipeline of one mini-batch (``batch_masks``):

1. ``displacements``: ``d = argmax_p(G_hat) - y`` of labelled joints, heatmap pixels (Eq. 11).
2. ``fit_gmm_torch``: a Gaussian mixture H fitted to the d by EM (Eq. 12), warm-started
   from the previous parameters, on the tensor's device. ``fit_gmm_sklearn`` is the
   reference (sklearn ``GaussianMixture``, full covariances); both run the same EM
   (same M-step, ``reg_covar``, stopping rule) and agree to 1e-4 from the same start.
3. ``mask_template``: H sampled on the integer grid Z = [-R..R]^2 and min-max
   normalised (Alg. 1 lines 4-5).
4. ``place_masks``: ``m(p) = norm(H(p - y))`` (Eq. 13, Alg. 1 line 8) for pixels p
   with ``|p - y| <= R``, 0 elsewhere.

Sub-pixel shift. The authors' code pastes a fixed 7x7 template (offsets -3..3,
whatever the radius R) at the integer argmax of the target heatmap and min-max
renormalises each pasted map. We follow Alg. 1 instead (Z = [-R..R]^2) and
evaluate H at the exact continuous offset ``p - y`` of every pixel: the same values
as pasting the template when y lies on a pixel centre, and a true sub-pixel shift
otherwise. The template's own min and max (over Z) normalise every mask, values are
clipped to [0, 1], and the support is the disk B of Eq. 6 because offsets are only
supervised inside it. m(p) = H(p - y) means the mask is largest where predictions
land (``y + d``), as in the authors' code.

Degenerate input, and what it gives (all finite, never NaN):

- no labelled joint: the fits return ``init`` (the previous parameters) if given,
  else ``default_params()``: one isotropic Gaussian at 0 with variance
  ``DEFAULT_VARIANCE`` (1 heatmap px^2, the authors' sigma at 128x96).
- fewer displacements than components: ``init`` if given, else a fit with as many
  components as displacements.
- a single joint or all displacements equal: EM collapses a covariance to
  ``reg_covar`` (as sklearn). The fits report that faithfully; the mask functions
  floor every covariance eigenvalue at ``MIN_VARIANCE`` = 1/12 px^2, the variance
  of the rounding error of an integer argmax (no argmax localises better), so the
  mask stays a finite Gaussian bump rather than a spike that misses every pixel.
- a flat density over Z (max = min): the normalised template is 1 everywhere
  (uniform weighting inside the disk, i.e. the binary mask B).
- non-finite joint positions in ``place_masks``: the mask of that joint is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Covariance regularisation added on the diagonal by every M-step (sklearn's default).
REG_COVAR = 1e-6
#: Variance (heatmap px^2) of the fallback Gaussian when no displacement is available.
DEFAULT_VARIANCE = 1.0
#: Eigenvalue floor (px^2) of covariances used for masks: the variance of a uniform
#: rounding error on one pixel, 1/12.
MIN_VARIANCE = 1.0 / 12.0
_EPS64 = float(np.finfo(np.float64).eps)
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class GMMParams:
    """A 2-D Gaussian mixture: ``weights`` (C,), ``means`` (C, 2) (x, y), ``covariances`` (C, 2, 2)."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def __post_init__(self) -> None:
        c = self.weights.shape[0] if self.weights.dim() == 1 else -1
        if c < 1 or self.means.shape != (c, 2) or self.covariances.shape != (c, 2, 2):
            raise ValueError(
                f"GMMParams shapes must be (C,), (C, 2), (C, 2, 2); got {tuple(self.weights.shape)}, "
                f"{tuple(self.means.shape)}, {tuple(self.covariances.shape)}")

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> GMMParams:
        """The same mixture as ``dtype`` tensors on ``device``."""
        return GMMParams(*(t.to(device=device, dtype=dtype) for t in (self.weights, self.means, self.covariances)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain lists (heatmap pixels)."""
        return {"n_components": self.n_components,
                "weights": self.weights.detach().cpu().double().tolist(),
                "means": self.means.detach().cpu().double().tolist(),
                "covariances": self.covariances.detach().cpu().double().tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "gmm dict") -> GMMParams:
        """Inverse of ``to_dict``; ``source`` (e.g. the gmm.json path) names the input in errors."""
        try:
            arrays = [torch.as_tensor(data[key], dtype=torch.float64)
                      for key in ("weights", "means", "covariances")]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: needs numeric 'weights', 'means', 'covariances' ({exc})") from exc
        params = cls(*arrays)
        cov = params.covariances
        det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
        if not all(torch.isfinite(t).all() for t in arrays) or (params.weights < 0).any() \
                or params.weights.sum() <= 0 or (cov[:, 0, 0] <= 0).any() or (det <= 0).any():
            raise ValueError(f"{source}: weights must be finite, >= 0 and not all 0; "
                             "covariances positive definite")
        sym = 0.5 * (cov + cov.transpose(1, 2))
        return cls(params.weights / params.weights.sum(), params.means, sym)


def default_params(device: torch.device | str | None = None) -> GMMParams:
    """One isotropic Gaussian at 0 with variance ``DEFAULT_VARIANCE``: the no-data fallback."""
    return GMMParams(torch.ones(1, dtype=torch.float64, device=device),
                     torch.zeros(1, 2, dtype=torch.float64, device=device),
                     DEFAULT_VARIANCE * torch.eye(2, dtype=torch.float64, device=device)[None])


def displacements(heatmap: torch.Tensor, joints_hm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``argmax_p(heatmap) - y`` (x, y) in heatmap px for joints with weight > 0, (M, 2)."""
    if heatmap.dim() != 4:
        raise ValueError(f"heatmap must be (N, K, h, w), got {tuple(heatmap.shape)}")
    n, k, _, w = heatmap.shape
    if joints_hm.shape != (n, k, 2) or weights.shape != (n, k):
        raise ValueError(f"joints_hm must be ({n}, {k}, 2) and weights ({n}, {k}); "
                         f"got {tuple(joints_hm.shape)} and {tuple(weights.shape)}")
    flat = heatmap.detach().reshape(n, k, -1).argmax(dim=-1)
    pred = torch.stack((flat % w, torch.div(flat, w, rounding_mode="floor")), dim=-1)
    return (pred.to(joints_hm.dtype) - joints_hm.detach())[weights > 0]


def _log_weighted_densities(dx: torch.Tensor, dy: torch.Tensor, params: GMMParams) -> torch.Tensor:
    """``log(w_c) + log N((dx, dy); mu_c, Sigma_c)`` per component: (C, *broadcast(dx, dy).shape).

    Closed-form 2x2 inverse and determinant: no linear-algebra kernels, no device syncs.
    """
    view = (-1,) + (1,) * max(dx.dim(), dy.dim())
    cov = params.covariances
    a, b, c = cov[:, 0, 0].view(view), cov[:, 0, 1].view(view), cov[:, 1, 1].view(view)
    det = a * c - b * b
    ex = dx.unsqueeze(0) - params.means[:, 0].view(view)
    ey = dy.unsqueeze(0) - params.means[:, 1].view(view)
    maha = (c * ex * ex - 2.0 * b * ex * ey + a * ey * ey) / det
    return torch.log(params.weights).view(view) - _LOG_2PI - 0.5 * torch.log(det) - 0.5 * maha


def _e_step(x: torch.Tensor, params: GMMParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-likelihood of x (M, 2) and responsibilities (C, M) under ``params``."""
    log_prob = _log_weighted_densities(x[:, 0], x[:, 1], params)
    log_norm = torch.logsumexp(log_prob, dim=0)
    return log_norm.mean(), torch.exp(log_prob - log_norm)


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float) -> GMMParams:
    """Maximum-likelihood mixture for responsibilities (C, M), sklearn's estimator (full covariances)."""
    nk = resp.sum(dim=1) + 10.0 * _EPS64
    means = resp @ x / nk[:, None]
    diff = x[None] - means[:, None]
    cov = torch.einsum("cm,cmi,cmj->cij", resp, diff, diff) / nk[:, None, None]
    cov = cov + reg_covar * torch.eye(2, dtype=x.dtype, device=x.device)
    return GMMParams(nk / nk.sum(), means, cov)


def _kmeans_init(x: torch.Tensor, n_components: int, seed: int, iters: int = 10) -> torch.Tensor:
    """Hard responsibilities (C, M) from k-means++ seeding and a few Lloyd steps, deterministic in seed."""
    gen = torch.Generator().manual_seed(seed)
    pts = x.cpu()
    centres = pts[torch.randint(len(pts), (1,), generator=gen)]
    for _ in range(1, n_components):
        d2 = torch.cdist(pts, centres).pow(2).min(dim=1).values
        pick = (torch.multinomial(d2 / d2.sum(), 1, generator=gen) if d2.sum() > 0
                else torch.randint(len(pts), (1,), generator=gen))
        centres = torch.cat([centres, pts[pick]])
    for _ in range(iters):
        label = torch.cdist(pts, centres).argmin(dim=1)
        for c in range(n_components):
            if (label == c).any():
                centres[c] = pts[label == c].mean(dim=0)
    label = torch.cdist(pts, centres).argmin(dim=1)
    return torch.nn.functional.one_hot(label, n_components).T.to(x)


def _fallback(x: torch.Tensor, n_components: int, init: GMMParams | None) -> GMMParams | int:
    """Degenerate cases: params to return directly, or the number of components to fit."""
    if x.shape[0] == 0:
        return init.to(x.device) if init is not None else default_params(x.device)
    if x.shape[0] < n_components:
        return init.to(x.device) if init is not None else x.shape[0]
    return n_components


def fit_gmm_torch(d: torch.Tensor, n_components: int = 1, init: GMMParams | None = None, seed: int = 0,
                  max_iter: int = 100, tol: float = 1e-3, reg_covar: float = REG_COVAR) -> GMMParams:
    """Eq. 12 by EM on ``d`` (M, 2) on its own device, float64, full 2x2 covariances.

    Starts from ``init`` when it has ``n_components`` components (warm start: the previous
    batch's or gmm.json's mixture), otherwise from a seeded k-means++ partition. Stops like sklearn: when the mean log-likelihood changes
    by less than ``tol`` between iterations (one host sync per iteration, the only one).
    """
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    x = d.detach().to(torch.float64).reshape(-1, 2)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fit_gmm_torch: displacements contain NaN or inf")
    plan = _fallback(x, n_components, init)
    if isinstance(plan, GMMParams):
        return plan
    params = init.to(x.device) if init is not None and init.n_components == plan \
        else _m_step(x, _kmeans_init(x, plan, seed), reg_covar)
    previous = torch.tensor(-math.inf, dtype=torch.float64, device=x.device)
    for _ in range(max_iter):
        lower_bound, resp = _e_step(x, params)
        params = _m_step(x, resp, reg_covar)
        if bool((lower_bound - previous).abs() < tol):
            break
        previous = lower_bound
    return params


def mean_log_likelihood(params: GMMParams, d: torch.Tensor) -> torch.Tensor:
    """Mean of ``log H(d_j; theta)`` over the rows of d (M, 2): the objective of Eq. 12."""
    x = d.detach().to(torch.float64).reshape(-1, 2)
    return _e_step(x, params.to(x.device))[0]


def _as_numpy(d: torch.Tensor | np.ndarray) -> np.ndarray:
    """Displacements as a finite float64 (M, 2) numpy array, or a clear error."""
    x = d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
    x = x.astype(np.float64).reshape(-1, 2)
    if not np.isfinite(x).all():
        raise ValueError("displacements contain NaN or inf")
    return x


def _sklearn_model(x: np.ndarray, n_components: int, seed: int, init: GMMParams | None, **kw: Any):
    """A fitted sklearn ``GaussianMixture`` (full covariances), started from ``init`` if given."""
    from sklearn.mixture import GaussianMixture

    start = {}
    if init is not None:
        cov = init.covariances.detach().cpu().double().numpy()
        start = {"weights_init": init.weights.detach().cpu().double().numpy(),
                 "means_init": init.means.detach().cpu().double().numpy(),
                 "precisions_init": np.linalg.inv(cov)}
    model = GaussianMixture(n_components, covariance_type="full", random_state=seed, **start, **kw)
    return model.fit(x)


def _from_sklearn(model) -> GMMParams:
    return GMMParams(*(torch.as_tensor(a, dtype=torch.float64)
                       for a in (model.weights_, model.means_, model.covariances_)))


def fit_gmm_sklearn(d: torch.Tensor | np.ndarray, n_components: int = 1, seed: int = 0,
                    init: GMMParams | None = None, max_iter: int = 100, tol: float = 1e-3,
                    reg_covar: float = REG_COVAR) -> GMMParams:
    """Reference fit of Eq. 12 with sklearn ``GaussianMixture`` (full covariances), CPU float64.

    Degenerate input falls back exactly as ``fit_gmm_torch`` does.
    """
    x = _as_numpy(d)
    plan = _fallback(torch.from_numpy(x), n_components, init)
    if isinstance(plan, GMMParams):
        return plan.to("cpu")
    if len(x) == 1:  # sklearn needs 2 samples; EM's fixed point for one point is closed-form
        return _m_step(torch.from_numpy(x), torch.ones(1, 1, dtype=torch.float64), reg_covar)
    start = init if init is not None and init.n_components == plan else None
    model = _sklearn_model(x, plan, seed, start, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    return _from_sklearn(model)


def select_components(d: torch.Tensor | np.ndarray, max_components: int = 3,
                      seed: int = 0) -> tuple[int, list[float], GMMParams]:
    """Fit 1..max_components mixtures with sklearn and pick the lowest BIC (sklearn's definition).

    Returns ``(k, bic_per_k, params_k)``; ``bic_per_k[c - 1]`` is the BIC of c components.
    Candidates stop at the number of displacements. Fewer than 2 displacements is an error
    here: this is the offline model-selection step and has nothing to select from.
    """
    x = _as_numpy(d)
    if len(x) < 2:
        raise ValueError(f"select_components: {len(x)} displacements (labelled joints); need at least 2")
    if max_components < 1:
        raise ValueError(f"max_components must be >= 1, got {max_components}")
    models = [_sklearn_model(x, c, seed, None, n_init=3) for c in range(1, min(max_components, len(x)) + 1)]
    bics = [float(m.bic(x)) for m in models]
    best = int(np.argmin(bics))
    return best + 1, bics, _from_sklearn(models[best])


def _floored(params: GMMParams, min_variance: float) -> GMMParams:
    """``params`` with every covariance eigenvalue raised to at least ``min_variance``.

    For a symmetric 2x2 matrix ``S = m I + s U`` (m the mean eigenvalue, s half their gap,
    U a symmetric reflection), clamping the eigenvalues keeps U: ``S' = m' I + s' U``.
    """
    cov = params.covariances
    a, b, c = cov[:, 0, 0], 0.5 * (cov[:, 0, 1] + cov[:, 1, 0]), cov[:, 1, 1]
    mid, half = 0.5 * (a + c), torch.sqrt((0.5 * (a - c)) ** 2 + b * b)
    hi, lo = (mid + half).clamp_min(min_variance), (mid - half).clamp_min(min_variance)
    eye = torch.eye(2, dtype=cov.dtype, device=cov.device)
    sym = torch.stack((torch.stack((a, b), -1), torch.stack((b, c), -1)), -2)
    scale = ((hi - lo) / (2.0 * half).clamp_min(1e-300))[:, None, None]
    new = 0.5 * (hi + lo)[:, None, None] * eye + scale * (sym - mid[:, None, None] * eye)
    return GMMParams(params.weights, params.means, new)


def _template_log_density(params: GMMParams, radius: float) -> torch.Tensor:
    """log H(z) on the integer grid Z = [-floor(R)..floor(R)]^2, rows y, columns x, float64 (Alg. 1 line 4)."""
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius!r}")
    half = math.floor(radius)
    grid = torch.arange(-half, half + 1, dtype=torch.float64, device=params.weights.device)
    return torch.logsumexp(_log_weighted_densities(grid[None, :], grid[:, None], params), dim=0)


def _normalise(ratio: torch.Tensor, low_ratio: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation (Alg. 1 line 5) of densities given relative to the template max.

    ``(H - H_min) / (H_max - H_min) = (ratio - low_ratio) / (1 - low_ratio)`` with
    ``ratio = H / H_max``: working in ratios avoids float underflow of tiny densities.
    A flat template (``H_min == H_max``) maps to 1 everywhere.
    """
    span = 1.0 - low_ratio
    flat = span <= 1e-12
    scaled = (ratio - low_ratio) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(ratio), scaled.clamp(0.0, 1.0))


def mask_template(params: GMMParams, radius: float, min_variance: float = MIN_VARIANCE) -> torch.Tensor:
    """Alg. 1 lines 4-5: normalised density on Z, (2R+1, 2R+1) float32 (R = floor(radius)), centre = zero displacement."""
    log_dens = _template_log_density(_floored(params.to(params.weights.device), min_variance), radius)
    ratio = torch.exp(log_dens - log_dens.max())
    return _normalise(ratio, ratio.min()).float()


def place_masks(params: GMMParams, joints_hm: torch.Tensor, heatmap_size: tuple[int, int], radius: float,
                min_variance: float = MIN_VARIANCE) -> torch.Tensor:
    """Eq. 13: ``m(p) = norm(H(p - y))`` inside the disk |p - y| <= R, 0 outside; (N, K, h, w) float32.

    ``joints_hm`` (N, K, 2) are sub-pixel joint positions (x, y) in heatmap px; the
    normalisation uses the template's min and max over Z (see the module docstring).
    """
    if joints_hm.dim() != 3 or joints_hm.shape[-1] != 2:
        raise ValueError(f"joints_hm must be (N, K, 2), got {tuple(joints_hm.shape)}")
    height, width = heatmap_size
    floored = _floored(params.to(joints_hm.device), min_variance)
    log_template = _template_log_density(floored, radius)
    log_high = log_template.max()
    low_ratio = torch.exp(log_template.min() - log_high).float()
    joints = joints_hm.detach().float()
    xs = torch.arange(width, dtype=torch.float32, device=joints.device)
    ys = torch.arange(height, dtype=torch.float32, device=joints.device)
    dx = xs.view(1, 1, 1, width) - joints[..., 0, None, None]
    dy = ys.view(1, 1, height, 1) - joints[..., 1, None, None]
    inside = dx * dx + dy * dy <= float(radius) ** 2
    log_dens = _log_weighted_densities(dx, dy, floored.to(joints.device, torch.float32))
    ratio = torch.exp(log_dens - log_high.float()).sum(dim=0)
    return torch.where(inside, _normalise(ratio, low_ratio), torch.zeros_like(ratio))


@torch.no_grad()
def batch_masks(heatmap: torch.Tensor, joints_hm: torch.Tensor, weights: torch.Tensor, params: GMMParams,
                radius: float, max_iter: int = 20,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, GMMParams]:
    """Alg. 1 for one mini-batch: displacements, EM warm-started from ``params``, masks.

    Returns the MGMs (N, K, h, w) and the refitted mixture (the next batch's
    warm start). ``gather`` (DDP) collects the displacements of the whole
    global mini-batch, so every rank fits the same mixture on all of them.
    """
    d = displacements(heatmap, joints_hm, weights)
    if gather is not None:
        d = gather(d)
    fitted = fit_gmm_torch(d, params.n_components, init=params, max_iter=max_iter)
    return place_masks(fitted, joints_hm, tuple(heatmap.shape[-2:]), radius), fitted
