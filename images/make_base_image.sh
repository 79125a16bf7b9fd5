#!/usr/bin/env bash
# `make base-image`: a minimal Debian (bookworm, Python 3.11) image made locally with debootstrap,
# for machines where no registry image (python:3.11-slim) can be pulled. The stage Dockerfiles take
# it as BASE_IMAGE; production builds use a registry image instead (../shared/notes/containers.md).
#
#   bash images/make_base_image.sh [--force]
#
# Environment: LOCAL_BASE_IMAGE (tag, default localhost/debian-base:bookworm), DEBIAN_SUITE
# (default bookworm), DEBIAN_MIRROR (default: the first mirror of this machine's apt sources, read
# now so no host name is written into the repository or left in the image), CONTAINERS_CONF
# (default images/containers.conf), CONTAINERS_STORAGE_CONF (another image store, e.g. in tests).
# Needs root (debootstrap) and podman or docker. A no-op when the tag exists, unless --force.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
image=${LOCAL_BASE_IMAGE:-localhost/debian-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
force=0
[[ ${1:-} == --force ]] && force=1

engine=$(command -v podman || command -v docker || true)
[[ -n $engine ]] || { echo "make_base_image: neither podman nor docker is installed" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "make_base_image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "make_base_image: debootstrap needs root" >&2; exit 1; }

if [[ $force == 0 ]] && "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "make_base_image: $image exists (use --force to rebuild)"
  exit 0
fi

mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror && -r /etc/apt/sources.list.d/debian.sources ]]; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z $mirror && -r /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
fi
[[ -n $mirror ]] || { echo "make_base_image: no Debian mirror in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/cal-pose-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
started=$(date +%s)
echo "make_base_image: debootstrap $suite from the machine's apt mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# Nothing machine-specific stays in the image: package caches, the bootstrap log, and the
# sources.list naming the mirror this machine happens to use.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/bootstrap.log
: >"$rootfs/etc/apt/sources.list"

tar -C "$rootfs" -c . | "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
size=$("$engine" image inspect --format '{{.Size}}' "$image")
echo "make_base_image: $image built in $(( $(date +%s) - started )) s, $(( size / 1000000 )) MB"
