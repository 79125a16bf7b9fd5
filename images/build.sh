#!/usr/bin/env bash
# `make images`: build the base image and every stage image (images/Dockerfile.<name>) with podman,
# or docker when podman is absent, tagged <registry>/<name>:<tag> exactly as the components name
# them (components/images.py is the one place that sets registry and tag), and record each build's
# time and image size as JSON.
#
#   bash images/build.sh [NAME ...]      # default: every image in components.images.IMAGES
#
# Environment:
#   BASE_IMAGE        what Dockerfile.base builds FROM; default the local Debian image of
#                     images/make_base_image.sh (made here when missing). With a registry, e.g.
#                     BASE_IMAGE=python:3.11-slim.
#   PIP_CA_BUNDLE     CA bundle handed to pip as the build secret `pipca` (default: the system
#                     bundle, when present). Secrets are mounted for one RUN, never stored.
#   WHEEL_DIRS        colon-separated local wheel folders bind-mounted into podman builds and given
#                     to pip as --find-links (default: the local folders of this machine's pip
#                     config, read now). Set it empty to install from the index only.
#   TORCH_INDEX_URL   passed to the torch images (e.g. a CPU wheel index); default: none.
#   IMAGES_RESULTS    where the JSON goes (default runs/images-build.json: a rebuild over a warm
#                     layer cache times the cache, not the build). The committed
#                     benchmarks/results/images.json comes from an empty store:
#                     IMAGES_RESULTS=$PWD/benchmarks/results/images.json make test-slow
#                     (tests/test_containers.py builds in a temporary store).
#   CONTAINERS_CONF / CONTAINERS_STORAGE_CONF   podman config and image store (default conf:
#                     images/containers.conf; tests point the store at a temporary folder).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
py=${PYTHON:-$root/.venv/bin/python}
results=${IMAGES_RESULTS:-$root/runs/images-build.json}

engine=$(command -v podman || command -v docker || true)
[[ -n $engine ]] || { echo "build.sh: neither podman nor docker is installed" >&2; exit 1; }
registry=$("$py" -c 'from components import images; print(images.registry())')
tag=$("$py" -c 'from components import images; print(images.tag())')
if (($#)); then names=("$@"); else read -r -a names <<<"$("$py" -c 'from components import images; print(*images.IMAGES)')"; fi

rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
record() {  # record NAME REF SECONDS: one row of the results JSON
  local size
  size=$("$engine" image inspect --format '{{.Size}}' "$2")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$size" >>"$rows"
  echo "build.sh: $2 built in $3 s, $((size / 1000000)) MB"
}

if [[ -z ${BASE_IMAGE:-} ]]; then
  BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/debian-base:bookworm}
  if ! "$engine" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    started=$(date +%s)
    LOCAL_BASE_IMAGE=$BASE_IMAGE bash "$here/make_base_image.sh"
    record debian-base "$BASE_IMAGE" $(( $(date +%s) - started ))
  fi
fi

# Local wheel folders: find-links folders of the pip config, and the flat `files/` folder beside
# a file:// simple index (so the big torch/NVIDIA wheels come from disk, not the network).
default_wheel_dirs() {
  "$py" -m pip config list 2>/dev/null |
    sed -n "s/^[^=]*\(find-links\|extra-index-url\|index-url\)='\(.*\)'$/\2/p" | tr ' ' '\n' |
    while read -r location; do
      dir=${location#file://}
      [[ $dir == /* ]] || continue
      [[ ${dir%/} == */simple ]] && dir=$(dirname "${dir%/}")/files
      [[ -d $dir ]] && echo "$dir"
    done | sort -u | paste -sd: -
}
wheel_dirs=${WHEEL_DIRS-$(default_wheel_dirs)}

common=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
pip_args=""
if [[ $(basename "$engine") == podman ]]; then
  common+=(--network host)
  IFS=: read -r -a dirs <<<"$wheel_dirs"
  for dir in "${dirs[@]}"; do
    [[ -n $dir ]] || continue
    common+=(-v "$dir:$dir:ro")
    pip_args+=" --find-links $dir"
  done
else
  export DOCKER_BUILDKIT=1  # RUN --mount=type=secret needs BuildKit
fi
common+=(--build-arg "PIP_EXTRA_ARGS=${pip_args# }")
ca=${PIP_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
[[ -n $ca && -s $ca ]] && common+=(--secret "id=pipca,src=$ca")

build() {  # build NAME FROM
  local name=$1 from=$2 ref="$registry/$1:$tag" started
  echo "build.sh: building $ref (FROM $from) with $(basename "$engine")"
  started=$(date +%s)
  "$engine" build "${common[@]}" --build-arg "BASE_IMAGE=$from" -f "$here/Dockerfile.$name" -t "$ref" "$root"
  record "$name" "$ref" $(( $(date +%s) - started ))
}

build base "$BASE_IMAGE"
for name in "${names[@]}"; do
  [[ $name == base ]] || build "$name" "$registry/base:$tag"
done

mkdir -p "$(dirname "$results")"
"$py" - "$rows" "$results" "$(basename "$engine")" "$("$engine" --version)" "$BASE_IMAGE" "$*" <<'EOF'
"""Write the build rows as benchmarks/results JSON (DESIGN.md §6 layout)."""
import json
import os
import platform
import sys
from datetime import UTC, datetime

rows_file, out, engine, engine_version, base, argv = sys.argv[1:]
rows = []
for line in open(rows_file):
    name, ref, seconds, size = line.rstrip("\n").split("\t")
    rows.append({"image": name, "ref": ref, "build_seconds": int(seconds),
                 "size_mb": round(int(size) / 1e6, 1), "engine": engine, "base_image": base})
doc = {"benchmark": "images", "command": f"bash images/build.sh {argv}".strip(),
       "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
       "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
       "versions": {"engine": engine_version, "python": platform.python_version()}, "rows": rows}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
print(f"build.sh: wrote {out}")
EOF
