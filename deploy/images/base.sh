#!/usr/bin/env bash
# Builds the images' base layer once, outside Bazel (it needs a Debian mirror; Bazel
# builds offline): a Debian 12 minbase rootfs with Python 3.11 and the non-root user
# `tuneforge` (uid 10001), as a gzipped tar with sorted entries dated 0. Bazel's
# @debian_base repository (bazel/oci.bzl) reads the cached file, so images rebuild
# offline and keep the base layer's digest until this script is run with --force.
# Usage: bash deploy/images/base.sh [--force]
# Env: TUNEFORGE_IMAGE_CACHE (default ~/.cache/tuneforge/images), DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail

CACHE=${TUNEFORGE_IMAGE_CACHE:-$HOME/.cache/tuneforge/images}
OUT=$CACHE/debian-12-python.tar.gz
PACKAGES=python3,libgomp1,libnuma1,ca-certificates

die() { echo "deploy/images/base.sh: error: $*" >&2; exit 1; }

if [[ -f $OUT && ${1:-} != --force ]]; then
  echo "deploy/images/base.sh: $OUT exists ($(du -h "$OUT" | cut -f1)); --force rebuilds it"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[[ $(id -u) == 0 ]] || die "debootstrap needs root"
mkdir -p "$CACHE"
root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
start=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
  >"$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
chroot "$root" groupadd --gid 10001 tuneforge
chroot "$root" useradd --uid 10001 --gid 10001 --home-dir /home/tuneforge --create-home --shell /bin/sh tuneforge
# What the services write: data, runs and models are volumes mounted here.
install -d -o 10001 -g 10001 "$root/data" "$root/data/datasets" "$root/data/runs" "$root/data/models" "$root/data/home"
# Caches and logs that differ on every debootstrap and nothing in a container reads.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/dev/* \
  "$root"/var/cache/ldconfig/aux-cache "$root"/tmp/* "$root"/root/.bash_history
tmp=$OUT.tmp
tar --sort=name --mtime=@0 --numeric-owner --xattrs --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$root" -cf - . | gzip -n -6 >"$tmp"
mv "$tmp" "$OUT"
echo "deploy/images/base.sh: $OUT: $(du -h "$OUT" | cut -f1) in $((SECONDS - start)) s"
