"""``python -m pipelines.compile`` (``make compile``): write pipelines/cal_pipeline.yaml.

The output is deterministic (same code, same registry/tag -> same bytes), so
the committed YAML can be checked for staleness by a test. Images default to
``localhost/cal-pose/<stage>:<version>``; set ``CAL_POSE_IMAGE_REGISTRY`` /
``CAL_POSE_IMAGE_TAG`` (or ``--registry`` / ``--tag``) for a cluster.
"""

import argparse
import os
import sys
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "cal_pipeline.yaml"


def compile_pipeline(output: str | Path = DEFAULT_OUTPUT, registry: str | None = None,
                     tag: str | None = None) -> Path:
    """Compile the DAG to ``output`` with the given image registry/tag (default: env, then built-ins)."""
    from components import images

    if registry:
        os.environ[images.REGISTRY_ENV] = registry
    if tag:
        os.environ[images.TAG_ENV] = tag
    loaded = [name for name in sys.modules if name.startswith("components.") and name != "components.images"]
    if loaded and (registry or tag):
        raise RuntimeError("set the image registry/tag before pipelines.cal_pipeline is imported "
                           "(component images are fixed at import time)")
    from kfp import compiler

    from pipelines.cal_pipeline import cal_pipeline

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cal_pipeline, str(output))
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cal-pose pipeline compile`` / ``python -m pipelines.compile``."""
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where to write the pipeline YAML")
    parser.add_argument("--registry", help="image registry prefix (default: $CAL_POSE_IMAGE_REGISTRY or "
                        "localhost/cal-pose)")
    parser.add_argument("--tag", help="image tag (default: $CAL_POSE_IMAGE_TAG or the package version)")


def run(args: argparse.Namespace) -> int:
    """Compile and print where the YAML went."""
    path = compile_pipeline(args.output, args.registry, args.tag)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
