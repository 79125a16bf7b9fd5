"""`cal-pose fit-gmm`: displacement statistics of a stage-1 model and the GMM behind the MGMs.

The stage-1 CAL model runs in eval mode over (a sample of) the training shards
without augmentation. For every labelled joint inside the heatmap it records
the displacement ``d = argmax_p(G_hat) - y`` in heatmap pixels (Eq. 11) and
fits a Gaussian mixture by EM (Eq. 12). The number of components is the one
with the lowest BIC over 1..``--max-components`` by default (``auto``), the
paper's (``paper``: 1 for inputs below 256x192, 2 from 256x192 up, §5.2 and
§5.5.2) or a given number; BIC is reported for every K either way and
``gmm.json`` says why this K.

The two rules disagree, and so do the measurements behind them. The paper's
Table 4 (HRNet-W32 trained to convergence on COCO, 128x96) has K = 1 / 2 / 3
at 74.3 / 73.6 / 72.8 AP: more components "skew the MGM". On this project's
accuracy benchmark (docs/results.md, a tiny net far from convergence) BIC
picks K = 3, components at the left/right confusions (dx = +-3.2) where the
coarse argmax often lands, and CAL at 64x48 scores about twice the AP it
gets with K = 1 (0.99 vs 0.47, two seeds each); at 128x96 the two are
within noise. BIC adapts to what the stage-1 model actually gets wrong,
which is the MGM's purpose, so it stays the default (as DESIGN.md chose);
``paper`` reproduces the paper's setting.

Outputs in ``--out``: ``gmm.json`` (weights, means, covariances in heatmap px,
chosen K and the reason, BIC per K, displacement statistics), and the plots
``displacements.png`` (scatter + 2D histogram, paper Fig. 5) and ``mask.png``
(the normalised mask on the grid Z, Fig. 6). Everything is logged to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cal_core import mgm, storage, tracking
from cal_core.checkpoint import codec_from_config

log = logging.getLogger(__name__)

#: Quantiles of |d| and of each axis reported in gmm.json.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cal-pose fit-gmm`` (docs/architecture.md, CLI contract)."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="stage-1 model.pt (local or s3://)")
    add("--shards", required=True, help="training shards the displacements are collected on")
    add("--out", required=True, help="output folder (local or s3://): gmm.json, displacements.png, mask.png")
    add("--components", default="auto", help="'auto' (lowest BIC over 1..--max-components), 'paper' (the "
        "paper's: 1 below a 256x192 input, 2 from it up) or a number")
    add("--max-components", type=int, default=3, help="BIC is computed (and, with 'auto', chosen) over 1..N")
    add("--max-samples", type=int, default=0, help="use at most N person instances (0 = all)")
    add("--batch-size", type=int, default=64)
    add("--workers", type=int, default=0)
    add("--device", default="auto")
    add("--seed", type=int, default=0)
    add("--experiment", default=None)
    add("--run-name", default=None)


#: Inputs at least this tall get the paper's high-resolution K (2); lower ones its low-resolution K (1).
HIGH_RESOLUTION_HEIGHT = 256


def parse_components(text: str | int) -> int | str:
    """``"auto"`` (by BIC) or ``"paper"`` (how K is chosen), or a positive number of components."""
    word = str(text).strip().lower()
    if word in ("auto", "paper"):
        return word
    if not word.isdigit() or int(word) < 1:
        raise ValueError(f"--components must be 'auto', 'paper' or a positive integer, got {text!r}")
    return int(word)


def paper_components(input_size: tuple[int, int]) -> int:
    """The paper's K (§5.2): 1 for low-resolution inputs (64x48, 128x96), 2 for high (256x192, 384x288).

    Table 4 at 128x96: 74.3 / 73.6 / 72.8 AP with K = 1 / 2 / 3; at
    256x192 K = 2 scores best. Sizes between are low below a height of
    :data:`HIGH_RESOLUTION_HEIGHT`.
    """
    return 1 if input_size[0] < HIGH_RESOLUTION_HEIGHT else 2


def displacement_stats(d: np.ndarray) -> dict[str, Any]:
    """Count, mean, std, covariance and quantiles of the displacements (heatmap px), and ``nearest_share``.

    ``nearest_share``: the share of joints whose coarse prediction (the
    argmax) is the joint's nearest heatmap pixel, ``|dx|, |dy| <= 0.5``,
    where the offset has the least to correct. (It replaces an
    ``exact_share`` of ``|d| < 1e-6``, always about 0: ``d`` is measured
    from the sub-pixel joint.)
    """
    norm = np.linalg.norm(d, axis=1)
    quant = {f"q{int(q * 100):02d}": q for q in QUANTILES}
    return {
        "count": int(len(d)),
        "mean": d.mean(axis=0).tolist(),
        "std": d.std(axis=0).tolist(),
        "covariance": np.cov(d.T).tolist() if len(d) > 1 else [[0.0, 0.0], [0.0, 0.0]],
        "norm_mean": float(norm.mean()),
        "norm_quantiles": {k: float(np.quantile(norm, q)) for k, q in quant.items()},
        "x_quantiles": {k: float(np.quantile(d[:, 0], q)) for k, q in quant.items()},
        "y_quantiles": {k: float(np.quantile(d[:, 1], q)) for k, q in quant.items()},
        "nearest_share": float(np.mean(np.abs(d).max(axis=1) <= 0.5)),
    }


def fit_mixture(d: np.ndarray, components: int | str, max_components: int, input_size: tuple[int, int],
                seed: int = 0) -> dict[str, Any]:
    """Fit the GMM of Eq. 12 with K chosen as ``components`` says (:func:`parse_components`); BIC always reported.

    Returns the gmm.json body without the statistics: the mixture (``weights``,
    ``means``, ``covariances``), ``n_components``, ``selection`` ("paper",
    "bic" or "fixed"), ``bic`` per K and a sentence saying why this K.
    """
    if len(d) == 0:
        raise ValueError("no displacements: the shards have no labelled joint inside the heatmap")
    wanted = paper_components(input_size) if components == "paper" else components
    if wanted != "auto" and int(wanted) > len(d):
        raise ValueError(f"cannot fit {wanted} components to {len(d)} displacements: use fewer components "
                         "or more training people (--max-samples)")
    best_k, bics, best = mgm.select_components(d, min(max_components, len(d)), seed)
    if wanted == "auto":
        params, k, selection = best, best_k, "bic"
        reason = f"lowest BIC over 1..{len(bics)} components ({bics[k - 1]:.1f})"
    else:
        k = int(wanted)
        params = mgm.fit_gmm_sklearn(d, k, seed)
        selection = "paper" if components == "paper" else "fixed"
        why = (f"the paper's K for a {input_size[0]}x{input_size[1]} input (§5.5.2)" if selection == "paper"
               else f"fixed by --components {components}")
        reason = f"{why}; the BIC minimum is at {best_k}"
    return {**params.to_dict(), "n_components": k, "selection": selection,
            "reason": reason, "bic": {str(i + 1): b for i, b in enumerate(bics)}}


def plot_displacements(d: np.ndarray, path: Path) -> None:
    """Paper Fig. 5: scatter of the displacements and their 2D histogram (heatmap px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(1.0, float(np.ceil(np.abs(d).max()))) if len(d) else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.scatter(d[:, 0], d[:, 1], s=3, alpha=0.3)
    left.set(title=f"displacements d = argmax - y (n={len(d)})", xlabel="dx (heatmap px)",
             ylabel="dy (heatmap px)", xlim=(-span, span), ylim=(span, -span), aspect="equal")
    edges = np.arange(-span - 0.5, span + 1.0, 1.0)
    counts, _, _, image = right.hist2d(d[:, 0], d[:, 1], bins=[edges, edges], cmap="viridis")
    right.set(title="2D histogram (1 px bins)", xlabel="dx", ylabel="dy", aspect="equal", ylim=(span, -span))
    fig.colorbar(image, ax=right, label="joints")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mask(params: mgm.GMMParams, radius: float, path: Path) -> None:
    """Paper Fig. 6: the min-max normalised mixture density on the grid Z = [-R..R]^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    template = mgm.mask_template(params, radius).numpy()
    half = template.shape[0] // 2
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(template, cmap="magma", extent=(-half - 0.5, half + 0.5, half + 0.5, -half - 0.5))
    ax.set(title=f"normalised mask ({params.n_components} component(s), R={radius:g})",
           xlabel="dx (heatmap px)", ylabel="dy (heatmap px)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def collect_displacements(model: torch.nn.Module, loader: Any, codec: Any, device: torch.device,
                          max_samples: int = 0) -> np.ndarray:
    """Eq. 11 over a loader of un-augmented training batches: ``argmax(G_hat) - y``, (M, 2) heatmap px."""
    from tqdm import tqdm

    model.eval().to(device)
    found: list[torch.Tensor] = []
    seen = 0
    for batch in tqdm(loader, desc="displacements", leave=False, dynamic_ncols=True):
        heatmap = model(batch["image"].to(device))["heatmap"].float()
        joints_hm, weights = codec.joint_labels(batch["keypoints"].to(device), batch["visibility"].to(device))
        found.append(mgm.displacements(heatmap, joints_hm.float(), weights).cpu())
        seen += len(batch["image"])
        if max_samples and seen >= max_samples:
            break
    return torch.cat(found).double().numpy() if found else np.zeros((0, 2))


def _loader(shards: str, codec: Any, batch_size: int, workers: int, max_samples: int, seed: int) -> Any:
    """Un-augmented training samples; a seeded random subset when ``max_samples`` is set."""
    from torch.utils.data import DataLoader, Subset

    from cal_core.data.dataset import ShardDataset, fork_safe_opencv

    dataset = ShardDataset(shards, codec, train=False, seed=seed)
    if max_samples and max_samples < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_samples]
        dataset = Subset(dataset, sorted(order.tolist()))
    fork_safe_opencv(workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def fit_gmm(checkpoint: str, shards: str, out: str, components: int | str = "auto", max_components: int = 3,
            max_samples: int = 0, batch_size: int = 64, workers: int = 0, device: str = "auto",
            seed: int = 0, experiment: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Collect displacements of the stage-1 model, fit and choose the GMM, write and log the outputs."""
    from cal_core.distributed import pick_device
    from cal_core.models import load_checkpoint, model_from_checkpoint

    components = parse_components(components)
    if max_components < 1 or max_samples < 0 or batch_size < 1 or workers < 0:
        raise ValueError(f"need --max-components >= 1, --max-samples >= 0 (0: all), --batch-size >= 1 and "
                         f"--workers >= 0, got {max_components}, {max_samples}, {batch_size}, {workers}")
    storage.check_writable(out)  # before the displacement pass, not after it
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    codec = codec_from_config(config)
    if not codec.has_offsets:  # heatmap/dark configs carry a radius too (unused): ask the codec
        raise ValueError(f"{checkpoint}: method {config.get('method')!r} predicts no offsets; "
                         "fit-gmm needs a CAL (or UDP) stage-1 model")
    params = {"checkpoint": checkpoint, "shards": shards, "components": components,
              "max_components": max_components, "max_samples": max_samples, "seed": seed}
    with tracking.stage_run("fit-gmm", experiment, run_name or "fit-gmm", params=params, local_dir=out) as tracker:
        loader = _loader(shards, codec, batch_size, workers, max_samples, seed)
        d = collect_displacements(model_from_checkpoint(ckpt), loader, codec, pick_device(device, 0), max_samples)
        report = {**fit_mixture(d, components, max_components, codec.input_size, seed), "stats": displacement_stats(d),
                  "radius": codec.radius, "heatmap_size": list(codec.heatmap_size),
                  "input_size": list(codec.input_size), "checkpoint": checkpoint, "shards": shards}
        _write_outputs(report, d, out, tracker)
        tracker.log_metrics({"n_components": report["n_components"], "displacements": len(d),
                             "disp_norm_mean": report["stats"]["norm_mean"],
                             **{f"bic_{k}": v for k, v in report["bic"].items()}})
    log.info("GMM: %d component(s) (%s); %d displacements -> %s", report["n_components"], report["reason"],
             len(d), out)
    return report


def _write_outputs(report: dict[str, Any], d: np.ndarray, out: str, tracker: tracking.Tracker) -> None:
    """gmm.json + the two plots to ``out`` (local or s3://, each written atomically) and to MLflow."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "gmm.json").write_text(json.dumps(report, indent=2))
        plot_displacements(d, folder / "displacements.png")
        plot_mask(mgm.GMMParams.from_dict(report), report["radius"], folder / "mask.png")
        for name in ("gmm.json", "displacements.png", "mask.png"):
            storage.write_bytes(storage.join(out, name), (folder / name).read_bytes())
        tracker.log_artifact(folder, "gmm")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cal-pose fit-gmm``."""
    report = fit_gmm(args.checkpoint, args.shards, args.out, args.components,
                     args.max_components, args.max_samples, args.batch_size, args.workers, args.device,
                     args.seed, args.experiment, args.run_name)
    print(json.dumps({k: report[k] for k in ("n_components", "reason", "bic")}, indent=2))
    return 0
