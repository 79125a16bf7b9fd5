"""Mixed Gaussian Masks (Alg. 1, Eqs. 11-13): displacements, EM vs sklearn, BIC, masks, degenerate input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from cal_core import mgm
from cal_core.mgm import GMMParams


def params(weights, means, covs) -> GMMParams:
    return GMMParams(*(torch.tensor(np.asarray(v), dtype=torch.float64) for v in (weights, means, covs)))


def blob(n: int, mean, std, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor(std, dtype=torch.float64) \
        + torch.tensor(mean, dtype=torch.float64)


ONE = blob(1500, [0.3, -0.2], [0.8, 1.2], seed=0)
TWO = torch.cat([blob(1000, [0.0, 0.0], [0.6, 0.6], seed=1), blob(600, [5.0, 1.0], [0.9, 0.5], seed=2)])


def test_displacements_by_hand():
    # Joint 0 peaks at pixel (x=2, y=1), labelled at (1.5, 1.25): d = (0.5, -0.25).
    # Joint 1 peaks at (x=0, y=2), labelled at (0, 0): d = (0, 2), but only when its weight > 0.
    heat = torch.zeros(1, 2, 3, 4)
    heat[0, 0, 1, 2] = 1.0
    heat[0, 1, 2, 0] = 1.0
    joints = torch.tensor([[[1.5, 1.25], [0.0, 0.0]]])
    d = mgm.displacements(heat, joints, torch.tensor([[1.0, 0.0]]))
    assert d.tolist() == [[0.5, -0.25]]
    d = mgm.displacements(heat, joints, torch.tensor([[2.0, 1.0]]))
    assert d.tolist() == [[0.5, -0.25], [0.0, 2.0]]
    with pytest.raises(ValueError, match="joints_hm must be"):
        mgm.displacements(heat, joints[:, :1], torch.ones(1, 2))


def test_one_component_em_is_the_sample_mean_and_biased_covariance():
    # Independent computation: with C = 1, EM's fixed point is the ML estimate
    # (numpy mean, covariance with 1/M) plus reg_covar on the diagonal.
    x = ONE.numpy()
    fit = mgm.fit_gmm_torch(ONE, 1)
    np.testing.assert_allclose(fit.means[0].numpy(), x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(fit.covariances[0].numpy(), np.cov(x.T, bias=True) + 1e-6 * np.eye(2), atol=1e-12)
    assert fit.weights.tolist() == pytest.approx([1.0])


@pytest.mark.parametrize(("data", "k"), [(ONE, 1), (TWO, 2), (TWO, 3)])
def test_torch_em_equals_sklearn_from_the_same_init(data, k):
    from sklearn.mixture import GaussianMixture

    start = params(np.full(k, 1.0 / k), [[float(i), 0.5 * i] for i in range(k)], [np.eye(2) * 2.0] * k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn may warn about convergence at k = 3
        sk = GaussianMixture(k, covariance_type="full", weights_init=start.weights.numpy(),
                             means_init=start.means.numpy(),
                             precisions_init=np.linalg.inv(start.covariances.numpy())).fit(data.numpy())
        wrapped = mgm.fit_gmm_sklearn(data, k, init=start)
    got = mgm.fit_gmm_torch(data, k, init=start)
    for ours, ref in ((got.weights, sk.weights_), (got.means, sk.means_), (got.covariances, sk.covariances_)):
        assert np.allclose(ours.numpy(), ref, atol=1e-4, rtol=0)
    assert np.allclose(wrapped.covariances.numpy(), sk.covariances_, atol=1e-12, rtol=0)
    assert mgm.mean_log_likelihood(got, data).item() == pytest.approx(sk.score(data.numpy()), abs=1e-4)


def test_torch_em_deterministic_given_seed_and_recovers_two_blobs():
    a = mgm.fit_gmm_torch(TWO, 2, seed=7)
    assert a.to_dict() == mgm.fit_gmm_torch(TWO, 2, seed=7).to_dict()
    order = torch.argsort(a.means[:, 0])
    assert torch.allclose(a.means[order], torch.tensor([[0.0, 0.0], [5.0, 1.0]], dtype=torch.float64), atol=0.1)
    assert torch.allclose(a.weights[order], torch.tensor([1000 / 1600, 600 / 1600], dtype=torch.float64), atol=0.01)


def test_warm_start_from_the_optimum_stays_there():
    best = mgm.fit_gmm_torch(TWO, 2, seed=0)
    again = mgm.fit_gmm_torch(TWO, 2, init=best, max_iter=3)
    assert torch.allclose(again.means, best.means, atol=1e-3)
    assert torch.allclose(again.covariances, best.covariances, atol=1e-3)


def test_bic_picks_one_and_two_components():
    k, bics, fit = mgm.select_components(ONE, 3)
    assert k == 1 and len(bics) == 3 and bics[0] == min(bics) and fit.n_components == 1
    k, bics, fit = mgm.select_components(TWO, 3)
    assert k == 2 and bics[1] == min(bics) and fit.n_components == 2
    # sklearn's definition: -2 * log-likelihood + (6C - 1) * log(M) for full 2-D covariances.
    m = len(TWO)
    loglik = mgm.mean_log_likelihood(fit, TWO).item() * m
    assert bics[1] == pytest.approx(-2 * loglik + 11 * math.log(m), rel=1e-9)
    with pytest.raises(ValueError, match="need at least 2"):
        mgm.select_components(torch.zeros(1, 2))


def test_mask_template_by_hand():
    # Isotropic variance 1, mean 0, R = 1: density ~ exp(-|z|^2 / 2), i.e. 1 at the centre,
    # e^-0.5 on the edges and e^-1 at the corners; min-max: 1, (e^-.5 - e^-1)/(1 - e^-1), 0.
    tpl = mgm.mask_template(mgm.default_params(), 1)
    edge = (math.exp(-0.5) - math.exp(-1.0)) / (1.0 - math.exp(-1.0))  # 0.377541
    expected = torch.tensor([[0.0, edge, 0.0], [edge, 1.0, edge], [0.0, edge, 0.0]])
    assert torch.allclose(tpl, expected, atol=1e-6)


def test_template_axes_are_x_columns_and_y_rows():
    # Mean displacement (+2, 0): predictions land right of the joint, the peak is at column R+2.
    tpl = mgm.mask_template(params([1.0], [[2.0, 0.0]], [np.eye(2) * 0.5]), 3)
    assert tpl.shape == (7, 7)
    assert divmod(int(tpl.argmax()), 7) == (3, 5)
    # The codecs' float radius: Z uses floor(R), the disk the exact R.
    assert mgm.mask_template(mgm.default_params(), 4.0).shape == (9, 9)
    assert mgm.mask_template(mgm.default_params(), 2.5).shape == (5, 5)
    with pytest.raises(ValueError, match="radius"):
        mgm.mask_template(mgm.default_params(), -1)


def test_place_masks_peak_range_and_support():
    p = mgm.fit_gmm_torch(ONE, 1)
    joints = torch.tensor([[[5.0, 6.0], [10.3, 4.7]], [[0.0, 0.0], [11.0, 15.0]]])
    masks = mgm.place_masks(params([1.0], [[0.0, 0.0]], [p.covariances[0].tolist()]), joints, (16, 12), 4)
    assert masks.shape == (2, 2, 16, 12) and masks.dtype == torch.float32
    assert masks.min() >= 0 and masks.max() <= 1
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(12.0), indexing="ij")
    for n in range(2):
        for k in range(2):
            x, y = joints[n, k].tolist()
            dist2 = (xs - x) ** 2 + (ys - y) ** 2
            assert torch.all(masks[n, k][dist2 > 16] == 0)
            assert dist2.flatten()[masks[n, k].argmax()] == dist2.min()  # peak at the nearest pixel
    assert masks[0, 0, 6, 5] == pytest.approx(1.0)
    # An integer joint gets exactly the template inside the disk.
    tpl = mgm.mask_template(params([1.0], [[0.0, 0.0]], [p.covariances[0].tolist()]), 4)
    disk = (torch.arange(-4.0, 5)[None] ** 2 + torch.arange(-4.0, 5)[:, None] ** 2) <= 16
    assert torch.allclose(masks[0, 0, 2:11, 1:10], torch.where(disk, tpl, 0), atol=1e-6)


def test_place_masks_subpixel_value_by_hand():
    # Variance 1, mean 0, joint (5.25, 6.5), pixel (5, 6): |p - y|^2 = 0.0625 + 0.25 = 0.3125,
    # density ratio exp(-0.15625) = 0.855345; template min over Z (R = 4) is exp(-16) ~ 1.1e-7.
    masks = mgm.place_masks(mgm.default_params(), torch.tensor([[[5.25, 6.5]]]), (16, 12), 4)
    assert masks[0, 0, 6, 5].item() == pytest.approx(0.855345, abs=1e-5)
    # Mean displacement (1, 0): the peak moves one pixel right of the joint (m(p) = H(p - y)).
    shifted = mgm.place_masks(params([1.0], [[1.0, 0.0]], [np.eye(2)]), torch.tensor([[[5.0, 6.0]]]), (16, 12), 4)
    assert divmod(int(shifted[0, 0].argmax()), 12) == (6, 6)


def test_covariance_floor_keeps_eigenvectors():
    rot = np.array([[math.cos(0.4), -math.sin(0.4)], [math.sin(0.4), math.cos(0.4)]])
    cov = rot @ np.diag([4.0, 1e-6]) @ rot.T
    floored = mgm._floored(params([1.0], [[0.0, 0.0]], [cov]), 1.0 / 12.0).covariances[0].numpy()
    expected = rot @ np.diag([4.0, 1.0 / 12.0]) @ rot.T
    np.testing.assert_allclose(floored, expected, atol=1e-12)
    wide = np.diag([2.0, 3.0])
    assert np.allclose(mgm._floored(params([1.0], [[0.0, 0.0]], [wide]), 1.0 / 12.0).covariances[0].numpy(), wide)


def _finite_mask(p: GMMParams, joints=((5.3, 6.6),)) -> torch.Tensor:
    masks = mgm.place_masks(p, torch.tensor([list(joints)]), (16, 12), 4)
    assert torch.isfinite(masks).all() and masks.min() >= 0 and masks.max() <= 1
    return masks


def test_degenerate_no_labelled_joint():
    empty = torch.zeros(0, 2)
    assert mgm.fit_gmm_torch(empty, 1).to_dict() == mgm.default_params().to_dict()
    assert mgm.fit_gmm_sklearn(empty, 2).to_dict() == mgm.default_params().to_dict()
    previous = params([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [np.eye(2)] * 2)
    assert mgm.fit_gmm_torch(empty, 2, init=previous).to_dict() == previous.to_dict()
    assert _finite_mask(mgm.fit_gmm_torch(empty, 1)).max() > 0.5


@pytest.mark.parametrize("fit", [mgm.fit_gmm_torch, mgm.fit_gmm_sklearn])
def test_degenerate_single_joint_and_equal_displacements(fit):
    one = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    p = fit(one, 1)
    assert np.allclose(p.means.numpy(), [[0.5, -0.5]], atol=1e-12) and torch.all(torch.isfinite(p.covariances))
    assert _finite_mask(p).max() > 0.5  # covariance floor: a bump, not a spike between pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's k-means warns about duplicate points
        same = fit(one.repeat(50, 1), 2)
    assert torch.all(torch.isfinite(same.covariances)) and torch.all(torch.isfinite(same.weights))
    assert _finite_mask(same).max() > 0.5
    # Fewer displacements than components, no previous params: fit as many components as points.
    assert fit(one, 3).n_components == 1


def test_degenerate_flat_density_and_bad_joints():
    huge = params([1.0], [[0.0, 0.0]], [np.eye(2) * 1e30])
    assert torch.all(mgm.mask_template(huge, 2) == 1)
    # Mean far outside Z with the floor variance: every density underflows (exp(-8000)); the
    # normalisation works in ratios to the template max, so the template still peaks at the corner.
    far = params([1.0], [[30.0, 30.0]], [np.eye(2) * 1e-6])
    tpl = mgm.mask_template(far, 4)
    assert torch.isfinite(tpl).all() and tpl[8, 8] == 1 and tpl[0, 0] == 0
    _finite_mask(far)
    masks = _finite_mask(mgm.default_params(), joints=((float("nan"), 3.0), (100.0, -50.0)))
    assert torch.all(masks == 0)
    with pytest.raises(ValueError, match="NaN"):
        mgm.fit_gmm_torch(torch.tensor([[float("nan"), 0.0]]), 1)
    with pytest.raises(ValueError, match="NaN"):
        mgm.fit_gmm_sklearn(np.array([[np.inf, 0.0]]), 1)


def test_params_json_round_trip_and_bad_input():
    fit = mgm.fit_gmm_torch(TWO, 2)
    text = json.dumps(fit.to_dict())
    back = GMMParams.from_dict(json.loads(text))
    for a, b in ((fit.weights, back.weights), (fit.means, back.means), (fit.covariances, back.covariances)):
        assert torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="gmm.json: needs"):
        GMMParams.from_dict({"weights": [1.0]}, source="gmm.json")
    bad = {"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1.0, 2.0], [2.0, 1.0]]]}
    with pytest.raises(ValueError, match="runs/gmm.json: .*positive definite"):
        GMMParams.from_dict(bad, source="runs/gmm.json")
    with pytest.raises(ValueError, match="not all 0"):
        GMMParams.from_dict({**bad, "weights": [0.0], "covariances": [[[1.0, 0.0], [0.0, 1.0]]]})
    with pytest.raises(ValueError, match="GMMParams shapes"):
        GMMParams(torch.ones(2), torch.zeros(1, 2), torch.eye(2)[None])


def test_batch_masks_end_to_end():
    # A batch whose predictions are the targets shifted by one pixel right: the refit
    # mixture's mean moves from the warm start (0, 0) towards (+1, 0) and the masks follow.
    g = torch.Generator().manual_seed(0)
    n, k, h, w = 8, 17, 32, 24
    joints = torch.rand(n, k, 2, generator=g) * torch.tensor([w - 3.0, h - 1.0])
    xs, ys = torch.arange(w).float(), torch.arange(h).float()
    heat = -((xs.view(1, 1, 1, w) - joints[..., 0, None, None] - 1.0) ** 2
             + (ys.view(1, 1, h, 1) - joints[..., 1, None, None]) ** 2)
    weights = (torch.rand(n, k, generator=g) > 0.2).float()
    masks, fitted = mgm.batch_masks(heat, joints, weights, mgm.default_params(), radius=4)
    assert masks.shape == (n, k, h, w) and torch.isfinite(masks).all()
    assert 0.5 < fitted.means[0, 0].item() < 1.5 and abs(fitted.means[0, 1].item()) < 0.5
    # The masks are the refitted mixture's (Eq. 13), not the warm start's: each peaks about one pixel
    # right of its joint, where the mixture's mean now is, and is zero outside the radius-4 disk.
    assert torch.equal(masks, mgm.place_masks(fitted, joints, (h, w), 4))
    flat = masks.flatten(2).argmax(-1)
    peak = torch.stack([flat % w, flat // w], -1).float()
    assert ((peak - joints - fitted.means[0]).abs() <= 1.0).all()
    assert (peak[..., 0] > joints[..., 0]).float().mean() > 0.9
    far = (xs.view(1, 1, 1, w) - joints[..., 0, None, None]) ** 2 + (ys.view(1, 1, h, 1) - joints[..., 1, None, None]) ** 2 > 16
    assert (masks[far] == 0).all()


def test_stage2_refuses_a_mixture_fitted_at_another_heatmap_size(tmp_path):
    """Displacements are in heatmap pixels: a 64x48 gmm.json must not drive 128x96 masks."""
    from cal_core.stage2 import MaskMaker

    data = {**mgm.fit_gmm_torch(ONE, 1).to_dict(), "heatmap_size": [16, 12], "input_size": [64, 48]}
    path = tmp_path / "gmm.json"
    path.write_text(json.dumps(data))
    assert MaskMaker.from_uri(str(path), "static", 4.0, (16, 12)).heatmap_size == (16, 12)
    with pytest.raises(ValueError, match=r"gmm.json was fitted on 16x12 heatmaps .* are 32x24"):
        MaskMaker.from_uri(str(path), "static", 4.0, (32, 24))


def test_batch_mode_fits_the_gathered_displacements():
    """With ``gather`` (DDP), the refit sees every rank's displacements, not only this rank's."""
    from cal_core.stage2 import MaskMaker

    heat = torch.zeros(1, 2, 16, 12)
    heat[0, 0, 5, 4] = 1.0
    heat[0, 1, 9, 7] = 1.0
    joints = torch.tensor([[[4.0, 5.0], [7.0, 9.0]]])  # this rank: displacements exactly (0, 0)
    weights = torch.ones(1, 2)
    other_rank = torch.tensor([[2.0, -1.0], [2.0, -1.0]], dtype=torch.float32)
    seen = []

    def gather(d: torch.Tensor) -> torch.Tensor:
        seen.append(d.clone())
        return torch.cat([d, other_rank])

    maker = MaskMaker(params([1.0], [[0.0, 0.0]], [np.eye(2)]), "batch", 4.0, (16, 12), gather=gather)
    maker(heat, joints, weights)
    assert seen and torch.equal(seen[0], torch.zeros(2, 2))
    # one component: its mean is the mean of all four displacements, (1, -0.5), not this rank's (0, 0)
    assert torch.allclose(maker.params.means[0].float(), torch.tensor([1.0, -0.5]), atol=1e-6)
