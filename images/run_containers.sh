#!/usr/bin/env bash
# `make run-containers`: the whole DAG with every stage in its own image (pipelines/run_containers.py)
# through kfp.local.DockerRunner. With podman, this starts podman's Docker-compatible API service on
# a private socket, points DOCKER_HOST at it, and stops the service (by its PID) when done, also on
# failure or Ctrl-C. With only docker, its own daemon is used. Arguments go to the Python entry
# (the flags of `make run`, e.g. --people 400 --epochs 2).
#
# Environment: CONTAINERS_CONF (default images/containers.conf), CONTAINERS_STORAGE_CONF (another
# image store, e.g. the tests' temporary one), PYTHON (default .venv/bin/python).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
py=${PYTHON:-$root/.venv/bin/python}

if command -v podman >/dev/null; then
  sock=/tmp/podman-$$.sock
  log=$(mktemp /tmp/podman-service-$$.XXXXXX.log)
  podman system service --time=0 "unix://$sock" >"$log" 2>&1 &
  service=$!
  stop_service() {
    kill "$service" 2>/dev/null || true
    wait "$service" 2>/dev/null || true
    rm -f "$sock" "$log"
  }
  trap stop_service EXIT
  trap 'exit 130' INT TERM
  export DOCKER_HOST=unix://$sock
  # Ready when the API answers a ping (a few seconds; give up after 60 s with the service's log).
  for _ in $(seq 120); do
    if "$py" -c 'import docker; docker.from_env().ping()' 2>/dev/null; then break; fi
    kill -0 "$service" 2>/dev/null || { cat "$log" >&2; echo "run_containers: podman service exited" >&2; exit 1; }
    sleep 0.5
  done
  "$py" -c 'import docker; docker.from_env().ping()' || { cat "$log" >&2; exit 1; }
  echo "run_containers: podman API service (pid $service) on $DOCKER_HOST"
elif ! command -v docker >/dev/null; then
  echo "run_containers: neither podman nor docker is installed" >&2
  exit 1
fi

"$py" -m pipelines.run_containers "$@"
