"""Shared results writer for the benchmarks.

Every benchmark writes ``benchmarks/results/<name>.json`` with the same
envelope, ``{"benchmark", "command", "machine", "versions", "code", "utc",
"rows"}``, so the numbers can be traced to the machine, library versions,
code (git commit, and whether the tree had uncommitted changes), time and
command line that produced them. ``--quick`` smoke runs go to
``benchmarks/results/quick/`` (not committed), so they never replace a real
result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Distributions whose versions are recorded with every result.
TRACKED_PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "numpy", "timm", "onnxruntime", "pycocotools", "opencv-python-headless", "pyarrow",
    "simplejpeg", "orjson",
)  # fmt: skip


def machine_info() -> dict[str, Any]:
    """Facts about the machine that ran the benchmark: OS, CPU, cores, accelerator."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["cuda"] = None
    return info


def versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_PACKAGES` (absent ones are left out) and cal-pose."""
    found = {}
    for name in (*TRACKED_PACKAGES, "cal-pose"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether tracked files differ from it (None outside git)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


#: The code a benchmark ran: taken when it starts (this module is imported first), not when it writes.
CODE_AT_START = code_version()


def write_results(name: str, rows: list[dict[str, Any]], out_dir: Path | str | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``<out_dir>/<name>.json`` with the shared envelope and return its path.

    ``extra`` adds top-level fields (e.g. ``"quick": True``, settings) next to the envelope;
    a quick run without ``out_dir`` goes to ``results/quick/``.
    """
    quick = bool((extra or {}).get("quick"))
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR / "quick" if quick else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "code": CODE_AT_START,
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(extra or {}),
        "rows": rows,
    }
    target = folder / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Print ``rows`` as a fixed-width text table (floats with 2 decimals) and return the text."""
    if not rows:
        print("(no rows)")
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[f"{r.get(c, ''):.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
