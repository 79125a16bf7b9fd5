"""The ``cal-pose`` command: one subcommand per pipeline stage, plus ``pipeline``.

Input and settings errors (``ValueError``, ``FileNotFoundError``) print one
line and exit 2, other ``OSError``s (permissions, a read-only or full disk)
and :class:`StageFailed` one line and exit 1 (``CAL_POSE_TRACEBACK=1`` shows the traceback); Ctrl-C
exits 130. Each subcommand lives in the module that implements the stage. That module
exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its subcommand is called, so ``cal-pose synth`` does not pay for torch or
kfp start-up it does not need.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: Set (to anything) to get the traceback of an input or settings error instead of its one-line message.
TRACEBACK_ENV = "CAL_POSE_TRACEBACK"


class StageFailed(RuntimeError):
    """A stage ran and failed for a reason its message explains (a worker died, a parity check): exit 1."""

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cal_core.data.synthetic", "generate a synthetic COCO-format low-resolution people set"),
    "downsample": ("cal_core.data.downsample", "COCO (local or s3://) -> low-resolution parquet shards"),
    "train": ("cal_core.train", "train a model (any method; CAL stage 1 or 2)"),
    "fit-gmm": ("cal_core.fit_gmm", "displacement statistics + GMM fit for Mixed Gaussian Masks"),
    "export": ("cal_core.export", "export a checkpoint to ONNX and check parity"),
    "evaluate": ("cal_core.evaluate", "COCO OKS AP of a model on val shards (pycocotools)"),
    "register": ("cal_core.register", "register an ONNX model in MLflow; promote to champion if better"),
    "pipeline": ("pipelines.cli", "compile / run locally / upload / submit / schedule the Kubeflow pipeline"),
}


def _usage() -> str:
    lines = ["usage: cal-pose <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`cal-pose <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` to the stage module named by its first word."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cal-pose: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"cal-pose {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"cal-pose {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, StageFailed) as exc:  # the message names the file, flag or path
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"cal-pose {name}: {exc}", file=sys.stderr)
        # 2: bad input or settings; 1: the machine refused (permissions, read-only or full disk) or the stage failed
        return 2 if isinstance(exc, ValueError | FileNotFoundError) else 1


if __name__ == "__main__":
    sys.exit(main())
