"""``cal-pose pipeline compile | run-local | upload | submit | schedule``: the pipeline from the command line.

``upload``, ``submit`` and ``schedule`` talk to a Kubeflow Pipelines endpoint with
``kfp.Client`` (token from ``$KFP_EXISTING_TOKEN`` when needed) and send the
compiled ``pipelines/cal_pipeline.yaml``; pipeline arguments are given as
``--param NAME=VALUE`` and typed from the compiled pipeline's parameters.
"""

import argparse
import secrets
import sys
from datetime import UTC, datetime

from pipelines import client, compile, run_local


def _add_remote(parser: argparse.ArgumentParser, runs: bool = True) -> None:
    """Flags shared by upload, submit and schedule (``runs``: also the experiment and pipeline arguments)."""
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    parser.add_argument("--namespace", default="kubeflow", help="Kubernetes namespace of the KFP profile")
    parser.add_argument("--package", default=str(compile.DEFAULT_OUTPUT), help="compiled pipeline YAML")
    if not runs:
        return
    parser.add_argument("--experiment", default="cal-pose", help="KFP experiment")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline argument (repeatable), e.g. --param coco_uri=s3://data/coco")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands and their flags."""
    sub = parser.add_subparsers(dest="action", required=True)
    compile.add_arguments(sub.add_parser("compile", help="write pipelines/cal_pipeline.yaml"))
    run_local.add_arguments(sub.add_parser("run-local", help="run the DAG here with kfp.local (= make run)"))
    submit = sub.add_parser("submit", help="start one run on a Kubeflow Pipelines server")
    _add_remote(submit)
    submit.add_argument("--run-name", default=None,
                        help="name of the run (default cal-pose-<UTC time>-<4 hex>: it also names the MLflow parent run)")
    submit.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    upload = sub.add_parser("upload", help="upload the pipeline (or a new version of it) to the KFP UI")
    _add_remote(upload, runs=False)
    upload.add_argument("--name", default="cal-pose", help="pipeline name in KFP")
    upload.add_argument("--version", required=True, help="version name when the pipeline exists already")
    upload.add_argument("--shared", action="store_true",
                        help="upload a shared pipeline (every profile sees it; multi-user KFP may allow only "
                             "admins) instead of one owned by --namespace")
    schedule = sub.add_parser("schedule", help="create a recurring run")
    _add_remote(schedule)
    schedule.add_argument("--cron", required=True, help="cron: 5 fields (minute first) or KFP's 6 (second first)")
    schedule.add_argument("--name", default="cal-pose-retrain", help="name of the recurring run")
    schedule.add_argument("--cache", action="store_true",
                          help="allow KFP caching (off by default: new data at the same coco_uri must be seen)")
    schedule.add_argument("--max-concurrency", type=int, default=1)
    schedule.add_argument("--catchup", action="store_true", help="backfill missed intervals")
    schedule.add_argument("--replace", action="store_true", help="delete recurring runs of the same name first")


def default_run_name() -> str:
    """``cal-pose-<UTC time>-<4 hex>``: distinct even for submits within one second (it names the MLflow parent run)."""
    return f"cal-pose-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen subcommand."""
    if args.action == "compile":
        return compile.run(args)
    if args.action == "run-local":
        return run_local.run(args)
    import urllib3

    try:
        return _remote(args)
    except urllib3.exceptions.HTTPError as exc:  # refused, unresolvable, TLS: no traceback for a wrong --host
        print(f"pipeline {args.action}: cannot reach the Kubeflow Pipelines API at {args.host}: {exc}",
              file=sys.stderr)
        return 1


def _remote(args: argparse.Namespace) -> int:
    """upload / submit / schedule against ``--host`` (arguments checked against the package first)."""
    if args.action == "upload":
        kfp_client = client.connect(args.host, args.namespace)
        namespace = None if args.shared else args.namespace
        print(f"pipeline {args.name}: {client.upload(kfp_client, args.name, args.version, args.package, namespace)}")
        return 0
    arguments = client.parse_arguments(args.param, args.package)
    kfp_client = client.connect(args.host, args.namespace)
    if args.action == "submit":
        run_name = args.run_name or default_run_name()
        run_id = client.submit(kfp_client, arguments, run_name, args.experiment, args.package,
                               enable_caching=False if args.no_cache else None)
        print(f"submitted run {run_id}")
    else:
        job_id = client.schedule(kfp_client, args.cron, arguments, args.name, args.experiment, args.package,
                                 enable_caching=args.cache, max_concurrency=args.max_concurrency,
                                 catchup=args.catchup, replace=args.replace)
        print(f"recurring run {job_id}: {client.kfp_cron(args.cron)}")
    return 0
