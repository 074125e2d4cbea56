#!/bin/sh
# Runs a binary with --help (see py_main_binary in bazel/defs.bzl): it must exit 0
# and print its usage, which proves the binary starts and all its imports resolve.
out=$("$1" --help 2>&1) || {
  echo "$1 --help exited non-zero:"
  echo "$out"
  exit 1
}
case "$out" in
  *usage:*) echo "$out" | head -n 3 ;;
  *)
    echo "$1 --help printed no usage:"
    echo "$out"
    exit 1
    ;;
esac
