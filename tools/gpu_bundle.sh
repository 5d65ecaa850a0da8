#!/usr/bin/env bash
# Runs the test suite and the benches on a machine that has a GPU but no Rust toolchain (the
# GPU machines this project is lent have CUDA and PyTorch, no cargo).
#
#   bash tools/gpu_bundle.sh build   # here: stripped release binaries into .gpu-bundle/ (~50 MB)
#   bash tools/gpu_bundle.sh run     # there, in a copy of this repository with .gpu-bundle/:
#                                    # info, check --device cuda, every test binary, the benches;
#                                    # logs in $OUT (or gpu-logs/)
#
# `build` takes every test and bench target cargo knows (tests/*.rs, the library's unit tests,
# each [[bench]] of Cargo.toml) and fails if one is missing from the bundle. `run` sets
# VPR_REQUIRE_GPU=1: a test or bench that finds no usable CUDA GPU fails instead of skipping.
# The test binaries have this checkout's path compiled in (fixtures, the vpr-engine binary), so
# `run` links that path to the copy it runs in when the two differ.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.gpu-bundle

executables() {  # "kind name path" of the test harnesses and benches cargo builds for the command
  "$@" --message-format=json |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (m["profile"]["test"] or m["target"]["kind"] == ["bench"]):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])'
}

targets() {  # "kind name" of every test and bench target of the package, from Cargo.toml and tests/
  cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json,sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "vpr-engine":
        for t in p["targets"]:
            if t["kind"][0] in ("test", "bench"):
                print(t["kind"][0], t["name"])'
}

case "${1:-}" in
build)
  rm -rf "$bundle"
  mkdir -p "$bundle/tests" "$bundle/benches"
  cargo build --release --bins
  strip -o "$bundle/vpr-engine" target/release/vpr-engine
  executables cargo test --release --no-run -p vpr-engine | while read -r kind name exe; do
    case "$kind" in
      # fake_cuda stands in for a GPU where there is none; it links the build machine's vgpu library
      test) if [ "$name" != fake_cuda ]; then strip -o "$bundle/tests/$name" "$exe"; fi ;;
      lib | bin) strip -o "$bundle/tests/$kind-$name" "$exe" ;;  # unit tests
    esac
  done
  executables cargo bench --no-run -p vpr-engine | while read -r kind name exe; do
    if [ "$kind" = bench ]; then strip -o "$bundle/benches/$name" "$exe"; fi
  done
  missing=$(targets | while read -r kind name; do
    case "$kind/$name" in
      test/fake_cuda) ;;
      test/*) [ -x "$bundle/tests/$name" ] || echo "test $name" ;;
      bench/*) [ -x "$bundle/benches/$name" ] || echo "bench $name" ;;
    esac
  done)
  if [ -n "$missing" ]; then
    echo "not in $bundle: $missing" >&2
    exit 1
  fi
  pwd >"$bundle/built_in"
  du -sh "$bundle"
  ;;
run)
  [ -d "$bundle" ] || { echo "no $bundle: run 'bash tools/gpu_bundle.sh build' first and carry it" >&2; exit 2; }
  built_in=$(cat "$bundle/built_in")
  if [ ! -e "$built_in" ]; then
    mkdir -p "$(dirname "$built_in")"
    ln -s "$(pwd)" "$built_in"
  elif [ "$(realpath "$built_in")" != "$(pwd)" ]; then
    echo "warning: $built_in exists and is not this copy; the tests read their fixtures there" >&2
  fi
  mkdir -p target/release
  cp "$bundle/vpr-engine" target/release/vpr-engine
  if [ -z "${VPR_NVRTC:-}" ]; then
    VPR_NVRTC=$(ls /usr/local/cuda/lib64/libnvrtc.so.1[0-9]* 2>/dev/null | head -n 1 || true)
    export VPR_NVRTC
  fi
  # cuDNN for the conv_gpu bench: PyTorch's wheel ships it outside the loader path
  cudnn_lib=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null || true)
  if [ -n "$cudnn_lib" ] && [ -d "$cudnn_lib" ]; then
    export LD_LIBRARY_PATH="$cudnn_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  export VPR_REQUIRE_GPU=1
  logs=${OUT:-gpu-logs}
  mkdir -p "$logs"
  status=0
  target/release/vpr-engine info 2>&1 | tee "$logs/info.txt"
  if ! grep -q '^  cuda:0 ' "$logs/info.txt"; then
    echo "FAILED: info lists no usable CUDA GPU (cuda:0); the tests below fail for it" >&2
    status=1
  fi
  target/release/vpr-engine check --device cuda >"$logs/check.txt" 2>&1 || status=1
  tail -n 1 "$logs/check.txt"
  for t in "$bundle"/tests/*; do
    if "$t" >"$logs/test-$(basename "$t").txt" 2>&1; then r=ok; else r=FAILED; status=1; fi
    echo "test $(basename "$t"): $r ($(grep -h '^test result' "$logs/test-$(basename "$t").txt" | tail -n 1))"
  done
  for b in "$bundle"/benches/*; do
    VPR_BENCH_PYTHON=${VPR_BENCH_PYTHON:-python3} "$b" >"$logs/bench-$(basename "$b").txt" 2>&1 || status=1
    tail -n 30 "$logs/bench-$(basename "$b").txt"
  done
  exit $status
  ;;
*)
  sed -n 2,9p "$0" >&2
  exit 2
  ;;
esac
