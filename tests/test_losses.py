"""Losses (Eqs. 3, 8, 14, 15) against numbers worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cal_core.losses import DEFAULT_ALPHA, build_loss


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_default_alpha_is_the_authors_offset_weight_in_the_equations_form():
    # udp: 0.5 * MSE + 0.7 * 0.5 * SmoothL1 -> 0.7; cal: 0.5 * L2 + 0.7 * L1 -> 1.4 (halved heatmap term).
    assert DEFAULT_ALPHA == {"udp": 0.7, "cal": 1.4}


def test_eq3_mse_by_hand():
    # N=1, K=2, 1x2 maps. joint 0: mean((0.5-1)^2, 0) = 0.125; joint 1: mean(1, 1) = 1.
    # Eq. 3: (0.125 + 1) / (N*K = 2) = 0.5625.
    pred = t([[[[0.5, 0.0]], [[1.0, 1.0]]]])
    target = t([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    loss = build_loss("heatmap")
    total, terms = loss({"heatmap": pred}, {"heatmap": target}, t([[1.0, 1.0]]))
    assert total.item() == pytest.approx(0.5625, abs=1e-7)
    assert terms["heatmap"].item() == pytest.approx(0.5625, abs=1e-7)
    # joint 1 unlabelled: only joint 0 counts, denominator stays N*K: 0.125 / 2.
    total, _ = build_loss("dark")({"heatmap": pred}, {"heatmap": target}, t([[1.0, 0.0]]))
    assert total.item() == pytest.approx(0.0625, abs=1e-7)


def test_eq8_udp_by_hand():
    # Disk B = [1, 0], logits [0, ln 3]: BCE = ln 2 (sigmoid 0.5 vs 1) and ln 4
    # (-log(1 - 0.75) vs 0); per-pixel mean = 1.5 ln 2.
    # Offsets, x: pred [0.5, 5], gt [0, 0]; y: pred [3, 0], gt [1, 0]. SmoothL1 (beta 1)
    # inside B only: x: 0.5*0.5^2 = 0.125, y: |2| - 0.5 = 1.5; mean over 2*1*2 = 4 values
    # = 0.40625. Eq. 8: 1.5 ln 2 + 0.7 * 0.40625.
    outputs = {"heatmap": t([[[[0.0, math.log(3.0)]]]]),
               "offset": t([[[[[0.5, 5.0]], [[3.0, 0.0]]]]])}
    targets = {"heatmap": t([[[[1.0, 0.0]]]]), "offset": t([[[[[0.0, 0.0]], [[1.0, 0.0]]]]])}
    total, terms = build_loss("udp")(outputs, targets, t([[1.0]]))
    assert terms["heatmap"].item() == pytest.approx(1.5 * math.log(2.0), abs=1e-6)
    assert terms["offset"].item() == pytest.approx(0.40625, abs=1e-7)
    assert total.item() == pytest.approx(1.5 * math.log(2.0) + 0.7 * 0.40625, abs=1e-6)


def _cal_example():
    # G = [1, 0.5], prediction [0.8, 0.5]: L2 mean = (0.04 + 0) / 2 = 0.02.
    # Offsets, x: pred [1, 3], gt [0, 1] -> |.| = [1, 2]; y: pred [0, -1], gt [0, 0] -> [0, 1].
    outputs = {"heatmap": t([[[[0.8, 0.5]]]]), "offset": t([[[[[1.0, 3.0]], [[0.0, -1.0]]]]])}
    targets = {"heatmap": t([[[[1.0, 0.5]]]]), "offset": t([[[[[0.0, 1.0]], [[0.0, 0.0]]]]])}
    return outputs, targets


def test_eq14_cal_stage1_by_hand():
    # L1 weighted by G: x: 1*1 + 0.5*2 = 2, y: 0 + 0.5*1 = 0.5; mean over 4 values = 0.625.
    # Eq. 14: 0.02 + 1.4 * 0.625 = 0.895.
    outputs, targets = _cal_example()
    total, terms = build_loss("cal", stage=1)(outputs, targets, t([[1.0]]))
    assert terms["heatmap"].item() == pytest.approx(0.02, abs=1e-7)
    assert terms["offset"].item() == pytest.approx(0.625, abs=1e-7)
    assert total.item() == pytest.approx(0.895, abs=1e-6)


def test_eq15_cal_stage2_by_hand():
    # MGM m = [0.25, 1]: x: 0.25*1 + 1*2 = 2.25, y: 0 + 1*1 = 1; mean over 4 = 0.8125.
    # Eq. 15: 0.02 + 1.4 * 0.8125 = 1.1575; with alpha 2: 0.02 + 1.625 = 1.645.
    outputs, targets = _cal_example()
    mgm = t([[[[0.25, 1.0]]]])
    total, terms = build_loss("cal", stage=2)(outputs, targets, t([[1.0]]), mgm=mgm)
    assert terms["offset"].item() == pytest.approx(0.8125, abs=1e-7)
    assert total.item() == pytest.approx(1.1575, abs=1e-6)
    total, _ = build_loss("cal", stage=2, alpha=2.0)(outputs, targets, t([[1.0]]), mgm=mgm)
    assert total.item() == pytest.approx(1.645, abs=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_cal_default_alpha_keeps_the_authors_balance_of_the_two_terms(stage):
    """Ours = 2 x the authors' CAL loss: (1/K) sum_k [0.5 MSE(G w) + 0.7 L1(O mask w)], means over (N, ...)."""
    outputs, targets = _random_batch(seed=3)
    weights = (torch.rand(3, 4, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    mask = torch.rand(3, 4, 5, 4, generator=torch.Generator().manual_seed(5)) if stage == 2 else targets["heatmap"]
    total, _ = build_loss("cal", stage=stage)(outputs, targets, weights, mgm=mask if stage == 2 else None)
    hm, off = outputs["heatmap"].detach().numpy(), outputs["offset"].detach().numpy()
    g, o, w, m = (targets["heatmap"].numpy(), targets["offset"].numpy(), weights.numpy(), mask.numpy())
    authors = 0.0
    for k in range(4):
        wk = w[:, k, None, None]
        authors += 0.5 * np.mean((hm[:, k] * wk - g[:, k] * wk) ** 2)
        masked = m[:, k, None] * wk[:, None]
        authors += 0.7 * np.mean(np.abs(off[:, k] * masked - o[:, k] * masked))
    assert total.item() == pytest.approx(2 * authors / 4, rel=1e-5)


def _random_batch(n: int = 3, k: int = 4, h: int = 5, w: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"heatmap": torch.randn(n, k, h, w, generator=g, requires_grad=True),
               "offset": torch.randn(n, k, 2, h, w, generator=g, requires_grad=True)}
    targets = {"heatmap": torch.rand(n, k, h, w, generator=g),
               "offset": torch.randn(n, k, 2, h, w, generator=g)}
    return outputs, targets


CASES = [("heatmap", 1), ("dark", 1), ("udp", 1), ("cal", 1), ("cal", 2)]


@pytest.mark.parametrize(("method", "stage"), CASES)
def test_weight_zero_joints_contribute_nothing(method, stage):
    outputs, targets = _random_batch()
    weights = torch.ones(3, 4)
    weights[0, 1] = 0.0
    weights[2, 3] = 0.0
    mgm = torch.rand(3, 4, 5, 4) if stage == 2 else None
    loss = build_loss(method, stage=stage)
    total, _ = loss(outputs, targets, weights, mgm=mgm)
    total.backward()
    used = ["heatmap"] if method in ("heatmap", "dark") else ["heatmap", "offset"]
    for key in used:
        grad = outputs[key].grad
        assert torch.all(grad[0, 1] == 0) and torch.all(grad[2, 3] == 0), key
        assert grad.abs().sum() > 0, key
    # Changing the predictions of the masked joints leaves the loss unchanged.
    changed = {key: out.detach().clone() for key, out in outputs.items()}
    for out in changed.values():
        out[0, 1] += 10.0
        out[2, 3] -= 7.0
    total2, _ = loss(changed, targets, weights, mgm=mgm)
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize(("method", "stage"), CASES)
def test_matches_independent_per_joint_loop(method, stage):
    # Independent computation: loop over (i, k), reduce each map with plain means, divide by N*K.
    outputs, targets = _random_batch(seed=1)
    weights = (torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    mgm = torch.rand(3, 4, 5, 4) if stage == 2 else None
    total, _ = build_loss(method, stage=stage, alpha=0.3)(outputs, targets, weights, mgm=mgm)
    expected = 0.0
    for i in range(3):
        for k in range(4):
            hm, off = outputs["heatmap"][i, k].detach(), outputs["offset"][i, k].detach()
            if method == "udp":
                p = torch.sigmoid(hm)
                b = targets["heatmap"][i, k]  # the udp target is the disk B (soft here: same formula)
                heat = (-(b * torch.log(p) + (1 - b) * torch.log(1 - p))).mean()
                e = (off - targets["offset"][i, k]).abs()
                sl1 = torch.where(e < 1, 0.5 * e**2, e - 0.5)
                term = heat + 0.3 * (sl1 * b).mean()
            else:
                term = ((hm - targets["heatmap"][i, k]) ** 2).mean()
                if method == "cal":
                    m = targets["heatmap"][i, k] if stage == 1 else mgm[i, k]
                    term = term + 0.3 * ((off - targets["offset"][i, k]).abs() * m).mean()
            expected += weights[i, k].item() * term.item()
    assert total.item() == pytest.approx(expected / 12, rel=1e-5)


@pytest.mark.parametrize(("method", "stage"), CASES)
def test_gradients_finite_on_extreme_inputs(method, stage):
    outputs, targets = _random_batch(seed=3)
    with torch.no_grad():
        outputs["heatmap"].mul_(100.0)  # saturated logits for the udp BCE
        outputs["offset"].mul_(100.0)
    mgm = torch.rand(3, 4, 5, 4) if stage == 2 else None
    total, terms = build_loss(method, stage=stage)(outputs, targets, torch.ones(3, 4), mgm=mgm)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(out.grad).all() for out in outputs.values() if out.grad is not None)


def test_bad_inputs_raise_clear_errors():
    outputs, targets = _random_batch()
    with pytest.raises(ValueError, match="unknown method"):
        build_loss("simcc")
    with pytest.raises(ValueError, match="stage 2"):
        build_loss("udp", stage=2)
    with pytest.raises(ValueError, match="needs the MGM"):
        build_loss("cal", stage=2)(outputs, targets, torch.ones(3, 4))
    with pytest.raises(ValueError, match="'mgm' has shape"):
        build_loss("cal", stage=2)(outputs, targets, torch.ones(3, 4), mgm=torch.ones(3, 4, 2, 2))
    with pytest.raises(ValueError, match="'weights' has shape"):
        build_loss("cal")(outputs, targets, torch.ones(3, 5))
    with pytest.raises(ValueError, match="outputs\\['offset'\\]"):
        build_loss("cal")({"heatmap": outputs["heatmap"]}, targets, torch.ones(3, 4))
    with pytest.raises(ValueError, match="takes no MGM"):
        build_loss("heatmap")(outputs, targets, torch.ones(3, 4), mgm=torch.ones(3, 4, 5, 4))


def test_half_precision_outputs_are_reduced_in_float32():
    # bf16 predictions (AMP): the loss is computed in float32 and equals the float32 loss of the
    # same (bf16-rounded) values.
    outputs, targets = _random_batch(seed=4)
    half = {key: out.detach().bfloat16() for key, out in outputs.items()}
    full = {key: out.float() for key, out in half.items()}
    mgm = torch.rand(3, 4, 5, 4)
    a, _ = build_loss("cal", stage=2)(half, targets, torch.ones(3, 4), mgm=mgm.bfloat16())
    b, _ = build_loss("cal", stage=2)(full, targets, torch.ones(3, 4), mgm=mgm.bfloat16().float())
    assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-6)
