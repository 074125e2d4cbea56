#!/usr/bin/env bash
# Builds and tests TuneForge with Bazel, offline: installs Debian's Bazel
# (bazel-bootstrap 4.2.3 and bazel-rules-java) if missing, then runs
# `bazel build //...` and `bazel test //...` against the venv from `make install`.
# Usage, from the repository root: bash bazel/ci.sh
# Env: TUNEFORGE_VENV (default: ./.venv), BAZEL_ARGS (extra flags for build and test).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

die() {
  echo "bazel/ci.sh: error: $*" >&2
  exit 1
}

step() {
  echo "bazel/ci.sh: $*"
}

# --- Bazel from Debian, installed once ---------------------------------------
PACKAGES=(bazel-bootstrap bazel-rules-java)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  SUDO=()
  if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || die "installing ${missing[*]} needs root (or sudo): run as root, or apt-get install ${missing[*]}"
    SUDO=(sudo -n)
  fi
  log=$(mktemp)
  step "installing ${missing[*]}"
  # Waits for a package manager that is already running instead of failing at once.
  APT=(apt-get -o DPkg::Lock::Timeout=300)
  if ! "${SUDO[@]}" "${APT[@]}" update -qq >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get update failed (output above)"
  fi
  if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get install ${missing[*]} failed (output above)"
  fi
  rm -f "$log"
fi
command -v bazel >/dev/null || die "bazel is not on PATH after installing bazel-bootstrap"
[[ -d /usr/share/bazel/rules/java ]] || die "/usr/share/bazel/rules/java is missing: reinstall bazel-rules-java"

# --- the venv Bazel builds with (bazel/venv.bzl reads the same variable) -----
VENV=${TUNEFORGE_VENV:-$ROOT/.venv}
[[ -x $VENV/bin/python3 ]] || die "no virtualenv at $VENV: run \`make install\` first (or set TUNEFORGE_VENV)"

bazel_or_die() {
  local what=$1
  shift
  if ! bazel "$@"; then
    die "\`bazel $*\` failed ($what; output above)"
  fi
}

# The server is ours for this run only: stop it however we leave.
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT

output_base=$(bazel info output_base 2>/dev/null) || die "\`bazel info output_base\` failed: is $ROOT a Bazel workspace?"
case "$output_base/" in
  "$ROOT"/*) die "Bazel's output base $output_base is inside the repository; set --output_user_root in ~/.bazelrc" ;;
esac

# Packages added to or removed from the venv since the last run (upgrades are
# seen anyway, through each package's RECORD).
bazel_or_die "re-reading the venv" sync --configure

read -r -a extra <<<"${BAZEL_ARGS:-}"

start=$SECONDS
bazel_or_die "build" build "${extra[@]}" //...
step "bazel build //... took $((SECONDS - start)) s"

start=$SECONDS
bazel_or_die "tests" test "${extra[@]}" //...
step "bazel test //... took $((SECONDS - start)) s"
