#!/usr/bin/env bash
# Builds here (nvcc, sm_90a, 2 cores: 15 min with a warm ccache, ~25 without) the binaries the pending diffs of docs/unverified need on
# the GPU, each from main with its diff applied in a throw-away worktree, and packs them gzipped into
# .device/pending (git-ignored) with run-pending.sh's inputs, for one device call (no build there):
#   run(command="bash docs/unverified/run-pending.sh pmtests pmab sdpa h200 pmsan tc3ab tests ab san l2ab",
#       carry=[".device/pending", ".whl"], kind="nvidia-h200")
# (stages in order of value; a call stops at its limit, and a warm machine takes the rest in a second
# call). .whl holds kvpress 0.5.4 for the H200 stage: pip download kvpress==0.5.4 --no-deps -d .whl.
# Variants: base (main), late / push (the select diffs), pm (paged-tensor-maps) and pm with the tensor
# maps' L2 promotion at 0 and 128 bytes (an untried knob); tc3 (main with every tensor-core decode kernel at three blocks an SM,
# -DKVTRIM_CUDA_DECODE_TC_BLOCKS=3: once −8 % for paged at 32k on an H200, never re-measured) is built only when named. Skip ones by listing the wanted ones:
#   docs/unverified/build-pending.sh base pm
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
out="$root/.device/pending"
work=/tmp/kvtrim-pending
mkdir -p "$out" "$work"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$out/"
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(base late push pm l2_0 l2_128)

# build NAME DIFF TEST_FILTER CUDA_FLAGS TARGET... : binaries NAME's targets, gzipped into $out.
build() {
  local name=$1 diff=$2 filter=$3 flags=$4; shift 4
  local tree="$work/$name"
  git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  git worktree add -q --detach "$tree" HEAD
  [ -z "$diff" ] || git -C "$tree" apply "$root/docs/unverified/$diff"
  cmake --preset cuda -S "$tree" -B "$tree/build" -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DKVTRIM_CUDA_TEST_FILTER="$filter" -DCMAKE_CUDA_FLAGS="$flags" > "$work/$name.configure.log"
  ninja -C "$tree/build" "$@" > "$work/$name.build.log"
  for target in "$@"; do
    local binary
    binary=$(find "$tree/build" -name "$target" -type f -perm -u+x | head -1)
    gzip -c "$binary" > "$out/${target}_$name.gz"
  done
  git worktree remove --force "$tree"
  echo "built $name: $*"
}

for variant in "${variants[@]}"; do
  case $variant in
    base) build base "" none "" bench_cuda_compress bench_cuda_decode_attention ;;
    late) build late select-offsets-late.diff 'budgets_test|contiguous_pipeline_test' "" bench_cuda_compress kvtrim_cuda_tests ;;
    push) build push select-cluster-push.diff 'budgets_test|contiguous_pipeline_test' "" bench_cuda_compress kvtrim_cuda_tests ;;
    pm) build pm paged-tensor-maps.diff 'decode_test|shared_paged_test|eviction_test' "" bench_cuda_decode_attention kvtrim_cuda_tests ;;
    tc3) build tc3 "" none "-DKVTRIM_CUDA_DECODE_TC_BLOCKS=3" bench_cuda_decode_attention ;;
    l2_0|l2_128) build "$variant" paged-tensor-maps.diff none "-DKVTRIM_CUDA_TENSOR_MAP_L2_PROMOTION=${variant#l2_}" \
                   bench_cuda_decode_attention ;;
    *) echo "build-pending.sh: unknown variant $variant (base late push pm l2_0 l2_128 tc3)" >&2; exit 2 ;;
  esac
done
du -sh "$out"
