#!/usr/bin/env bash
# `make images`: build every container image of deploy/docker with podman, on a base made here.
#
#   quickdraw-base:bookworm   Debian bookworm (debootstrap --variant=minbase) + python3 3.11, python3-venv,
#                             python3-pip, python-is-python3, ca-certificates; the host's CA bundle and
#                             /etc/pip.conf copied in, so pip in a build reaches the package index. It stands in
#                             for python:3.11-slim-bookworm where no registry serves base images.
#   quickdraw-gateway:0.1.0   deploy/docker/gateway.Dockerfile (slim: no TensorFlow)
#   quickdraw-full:0.1.0      deploy/docker/full.Dockerfile (the tf extra: embedded backend and trainer)
#
# Needs root. Installs podman, debootstrap and runc with apt-get when missing, and writes
# /etc/containers/containers.conf (runc, cgroupfs, file-descriptor limits at the host's hard limit) when it is
# absent or one this script wrote. Rebuilds the base only when it is missing (REBUILD_BASE=1 forces it).
# Environment: PYTHON_IMAGE (use an existing base instead), TAG (default 0.1.0), IMAGES ("gateway full").
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-0.1.0}
IMAGES=${IMAGES:-gateway full}
BASE=${PYTHON_IMAGE:-localhost/quickdraw-base:bookworm}
MARK="# written by quickdraw scripts/images.sh"

if [ "$(id -u)" != 0 ]; then
  echo "images: needs root (apt-get, debootstrap, rootful podman)" >&2
  exit 2
fi

missing=()
for tool in podman debootstrap runc; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "images: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap runc >/dev/null
fi

conf=/etc/containers/containers.conf
hard=$(ulimit -Hn)
# podman 4.3 runs itself with at most 32768 processes and a container cannot be given more than it has.
hard_nproc=$(ulimit -Hu)
if [ "$hard_nproc" = unlimited ] || [ "$hard_nproc" -gt 32768 ]; then hard_nproc=32768; fi
if [ ! -e "$conf" ] || grep -qF "$MARK" "$conf"; then
  mkdir -p /etc/containers
  cat >"$conf" <<EOF
$MARK
# This host: cgroups v1, no systemd as PID 1, a hard limit of $hard open files, no CAP_SYS_RESOURCE; podman's
# defaults (crun, the systemd cgroup manager, journald, nofile 1048576, nproc 4194304) do not run here, and
# nproc cannot exceed podman's own (32768).
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=$hard_nproc:$hard_nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
else
  echo "images: keeping $conf (not written by this script); it needs runtime = \"runc\", nofile <= $hard and" \
    "nproc <= $hard_nproc here"
fi

base_image() {
  local root mirror
  root=$(mktemp -d /var/tmp/quickdraw-base.XXXXXX)
  # Debian's mirror as apt is configured here (deb822 sources first, then the one-line format).
  mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "images: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd \
    bookworm "$root" "$mirror" >/var/tmp/quickdraw-debootstrap.log 2>&1 \
    || { tail -20 /var/tmp/quickdraw-debootstrap.log >&2; rm -rf "$root"; exit 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
  tar -C "$root" --numeric-owner -c . \
    | podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$root"
}

if [ -z "${PYTHON_IMAGE:-}" ] && { [ "${REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; }; then
  base_image
fi

for name in $IMAGES; do
  echo "images: building quickdraw-$name:$TAG (deploy/docker/$name.Dockerfile, PYTHON_IMAGE=$BASE)"
  start=$(date +%s)
  log=/var/tmp/quickdraw-build-$name.log
  podman build --network=host --build-arg "PYTHON_IMAGE=$BASE" \
    -f "deploy/docker/$name.Dockerfile" -t "quickdraw-$name:$TAG" . >"$log" 2>&1 \
    || { tail -40 "$log" >&2; echo "images: building quickdraw-$name failed (log: $log)" >&2; exit 1; }
  echo "images: quickdraw-$name:$TAG built in $(( $(date +%s) - start )) s"
done

podman image prune -f >/dev/null  # the build stages
echo "images: sizes (podman image inspect)"
for image in "$BASE" $(for n in $IMAGES; do echo "localhost/quickdraw-$n:$TAG"; done); do
  podman image inspect --format '{{.Size}}' "$image" \
    | awk -v i="$image" '{printf "  %-40s %8.1f MB\n", i, $1 / 1e6}'
done
