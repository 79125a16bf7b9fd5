"""Human-readable evaluation output: markdown tables, the OKS histogram, skeleton overlays.

Kept apart from evaluate.py so that scoring (numbers) and presentation
(pictures and prose) change independently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cal_core.skeleton import KEYPOINT_NAMES, LIMBS

#: Columns of the paper's Table 8 (plus the ARs pycocotools also reports).
TABLE_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APM", "APL", "AR")
OVERLAY_SCALE = 4
_PRED_COLOR = (255, 64, 32)
_GT_COLOR = (40, 220, 255)


def _pct(value: float) -> str:
    """A [0, 1] metric as a percentage with one decimal; pycocotools' -1 (undefined) as '-'."""
    return "-" if value < 0 else f"{100.0 * value:.1f}"


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table like the paper's Table 8: Method, Backbone, Input size, AP ... AR (in %)."""
    head = ["Method", "Backbone", "Input size", *TABLE_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get("method", "")), str(row.get("backbone", "")), str(row.get("input_size", ""))]
        cells += [_pct(float(row[m])) for m in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def keypoint_error_table(errors_px: np.ndarray, counts: np.ndarray) -> str:
    """Markdown table of the mean image-pixel error per keypoint over matched people."""
    lines = ["| Keypoint | Mean error (px) | Joints |", "|---|---|---|"]
    for name, err, n in zip(KEYPOINT_NAMES, errors_px, counts, strict=True):
        lines.append(f"| {name} | {'-' if n == 0 else f'{err:.2f}'} | {int(n)} |")
    return "\n".join(lines)


def oks_histogram_figure(best_oks: np.ndarray, bins: int = 20) -> Any:
    """Matplotlib figure: histogram of the best OKS per labelled person (0 = missed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(best_oks, bins=bins, range=(0.0, 1.0), color="#3b7dd8", edgecolor="white")
    ax.set_xlabel("best OKS per person")
    ax.set_ylabel("people")
    ax.set_title(f"OKS of {len(best_oks)} labelled people")
    fig.tight_layout()
    return fig


def oks_histogram_text(best_oks: np.ndarray, bins: int = 10) -> str:
    """Markdown table of the OKS histogram (counts per bin), for reports read as text."""
    counts, edges = np.histogram(best_oks, bins=bins, range=(0.0, 1.0))
    lines = ["| OKS | People |", "|---|---|"]
    lines += [f"| {lo:.1f}-{hi:.1f} | {int(c)} |" for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]
    return "\n".join(lines)


def draw_overlay(image: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 gt: np.ndarray | None = None, score_thr: float = 0.2, scale: int = OVERLAY_SCALE) -> Any:
    """PIL image: ``image`` (H, W, 3) uint8 upscaled ``scale`` x with the predicted skeleton.

    ``keypoints`` (K, 2) are in ``image`` pixels (UDP centres); joints at or
    below ``score_thr`` are not drawn. ``gt`` (K, 3) adds the labelled ground
    truth as small cyan dots.
    """
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    canvas = Image.fromarray(np.ascontiguousarray(image)).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)

    def to_canvas(p: np.ndarray) -> tuple[float, float]:
        return (float(p[0]) + 0.5) * scale - 0.5, (float(p[1]) + 0.5) * scale - 0.5

    if gt is not None:
        for x, y, v in gt:
            if v > 0:
                cx, cy = to_canvas(np.array([x, y]))
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=_GT_COLOR)
    shown = scores > score_thr
    for a, b in LIMBS:
        if shown[a] and shown[b]:
            draw.line([to_canvas(keypoints[a]), to_canvas(keypoints[b])], fill=_PRED_COLOR, width=2)
    for k in np.flatnonzero(shown):
        cx, cy = to_canvas(keypoints[k])
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=_PRED_COLOR, width=2)
    return canvas


def markdown_report(title: str, table_rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, float],
                    errors_px: np.ndarray, counts: np.ndarray, best_oks: np.ndarray,
                    notes: Sequence[str] = ()) -> str:
    """The evaluation report: Table-8-style row, all COCO metrics, per-keypoint errors, OKS histogram."""
    all_metrics = " | ".join(f"{k} {_pct(v)}" for k, v in metrics.items())
    parts = [
        f"# {title}", "",
        metrics_table(table_rows), "",
        f"All COCO keypoint metrics (%, pycocotools): {all_metrics}", "",
        "## Mean error per keypoint (image px, people matched at OKS 0.5)", "",
        keypoint_error_table(errors_px, counts), "",
        "## Best OKS per labelled person", "",
        oks_histogram_text(best_oks), "",
        "![OKS histogram](oks_histogram.png)", "",
    ]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)
