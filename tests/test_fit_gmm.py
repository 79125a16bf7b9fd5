"""fit-gmm: the mixture behind the MGMs is recovered from known displacements and K is chosen right."""

from __future__ import annotations

import numpy as np
import pytest

from cal_core import mgm
from cal_core.fit_gmm import (
    displacement_stats,
    fit_gmm,
    fit_mixture,
    paper_components,
    parse_components,
    plot_displacements,
    plot_mask,
)


def _one_component(rng: np.random.Generator, n: int = 2000) -> np.ndarray:
    return rng.multivariate_normal([0.3, -0.2], [[0.8, 0.2], [0.2, 0.5]], size=n)


def _two_components(rng: np.random.Generator, n: int = 2500) -> np.ndarray:
    a = rng.multivariate_normal([-2.0, 0.0], [[0.3, 0.0], [0.0, 0.3]], size=int(n * 0.3))
    b = rng.multivariate_normal([1.5, 1.0], [[0.5, -0.1], [-0.1, 0.4]], size=n - len(a))
    return np.concatenate([a, b])


def test_one_component_is_recovered_and_chosen_by_bic() -> None:
    d = _one_component(np.random.default_rng(0))
    fit = fit_mixture(d, "auto", max_components=3, input_size=(64, 48))
    assert fit["n_components"] == 1 and fit["selection"] == "bic"
    assert min(fit["bic"], key=lambda k: fit["bic"][k]) == "1"
    np.testing.assert_allclose(fit["means"][0], [0.3, -0.2], atol=0.05)
    np.testing.assert_allclose(fit["covariances"][0], [[0.8, 0.2], [0.2, 0.5]], atol=0.06)


def test_two_components_are_recovered_and_chosen_by_bic() -> None:
    d = _two_components(np.random.default_rng(1))
    fit = fit_mixture(d, "auto", max_components=3, input_size=(64, 48))
    assert fit["n_components"] == 2
    order = np.argsort(np.asarray(fit["means"])[:, 0])
    means = np.asarray(fit["means"])[order]
    weights = np.asarray(fit["weights"])[order]
    np.testing.assert_allclose(means, [[-2.0, 0.0], [1.5, 1.0]], atol=0.08)
    np.testing.assert_allclose(weights, [0.3, 0.7], atol=0.03)
    np.testing.assert_allclose(np.asarray(fit["covariances"])[order][1], [[0.5, -0.1], [-0.1, 0.4]], atol=0.06)
    assert mgm.GMMParams.from_dict(fit).n_components == 2


def test_fixed_components_override_bic_and_say_so() -> None:
    d = _two_components(np.random.default_rng(2))
    fit = fit_mixture(d, 1, max_components=3, input_size=(256, 192))
    assert fit["n_components"] == 1 and fit["selection"] == "fixed"
    assert "BIC minimum is at 2" in fit["reason"]
    assert len(fit["bic"]) == 3


@pytest.mark.parametrize(("input_size", "k"), [((64, 48), 1), ((128, 96), 1), ((192, 144), 1), ((256, 192), 2),
                                               ((384, 288), 2)])
def test_paper_takes_the_papers_k_for_the_input_size_whatever_bic_says(input_size, k: int) -> None:
    """§5.2: K = 1 at 64x48 and 128x96, 2 at 256x192 and 384x288."""
    assert paper_components(input_size) == k
    d = _two_components(np.random.default_rng(3))  # BIC's choice is 2 here, the paper's may differ
    fit = fit_mixture(d, "paper", max_components=3, input_size=input_size)
    assert fit["n_components"] == k and fit["selection"] == "paper"
    assert f"the paper's K for a {input_size[0]}x{input_size[1]} input" in fit["reason"]
    assert "BIC minimum is at 2" in fit["reason"] and len(fit["bic"]) == 3


def test_bic_stays_within_max_components_and_k_within_the_samples() -> None:
    """--components 500 on 533 displacements once fitted BIC for all 500 K (10+ minutes, no output)."""
    d = _one_component(np.random.default_rng(4), n=40)
    assert len(fit_mixture(d, 5, max_components=3, input_size=(64, 48))["bic"]) == 3
    with pytest.raises(ValueError, match="cannot fit 41 components to 40 displacements"):
        fit_mixture(d, 41, max_components=3, input_size=(64, 48))
    assert len(fit_mixture(d[:2], "auto", max_components=3, input_size=(64, 48))["bic"]) == 2


def test_no_displacements_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no displacements"):
        fit_mixture(np.zeros((0, 2)), "auto", 3, (64, 48))


@pytest.mark.parametrize("method", ["heatmap", "dark"])
def test_a_model_without_offsets_is_refused_before_any_work(method: str, tmp_path) -> None:
    """heatmap/dark codec configs carry an (unused) radius too: the guard must ask the codec."""
    import torch

    from cal_core.codecs import build_codec
    from cal_core.models import build_model

    model = build_model("tiny", "heatmap", input_size=(64, 48))
    config = {"method": method, "backbone": "tiny", "head": "heatmap", "input_size": [64, 48],
              "codec": build_codec(method, (64, 48)).config()}
    assert config["codec"].get("radius")  # the case the guard once missed
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=f"method '{method}' predicts no offsets"):
        fit_gmm(str(tmp_path / "model.pt"), str(tmp_path / "no-shards"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_parse_components() -> None:
    assert parse_components("auto") == "auto" and parse_components(" Paper ") == "paper"
    assert parse_components("2") == 2 and parse_components(3) == 3
    for bad in ("0", "two", "-1", "bic"):
        with pytest.raises(ValueError, match="'auto', 'paper' or a positive integer"):
            parse_components(bad)


def test_stats_and_plots(tmp_path) -> None:
    d = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [1.0, 1.0], [0.5, -0.5], [0.2, 0.6]])
    stats = displacement_stats(d[:4])
    assert stats["count"] == 4 and stats["nearest_share"] == 0.25
    assert displacement_stats(d)["nearest_share"] == pytest.approx(2 / 6)  # (0, 0) and (0.5, -0.5); 0.6 is past
    np.testing.assert_allclose(stats["mean"], [0.5, 0.0])
    assert stats["norm_quantiles"]["q50"] == pytest.approx(1.0)
    plot_displacements(d, tmp_path / "d.png")
    plot_mask(mgm.default_params(), 4.0, tmp_path / "m.png")
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000
