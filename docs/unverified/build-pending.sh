#!/usr/bin/env bash
# Builds here (nvcc, sm_90a, 2 cores: ~5 min a variant with a warm ccache) the binaries that pending device work
# needs, each from main (with a docs/unverified diff applied, for a diff's variant) in a throw-away worktree, and packs
# them gzipped into .device/pending (git-ignored) for run-pending.sh, so that one device call runs them (no build there):
#   run(command="bash docs/unverified/run-pending.sh sdpa h200", carry=[".device/pending", ".whl"], kind="nvidia-h200")
# .whl holds kvpress 0.5.4 for the h200 stage: pip download kvpress==0.5.4 --no-deps -d .whl.
# Variants: base (main's compress and decode benches); peer (bench_peer_flashinfer_decode: FlashInfer 0.7.4's paged
# decode and kvtrim's shared_paged decode in one binary). A new diff gets a line here, `build NAME DIFF TEST_FILTER CUDA_FLAGS TARGET...`, and a stage in
# run-pending.sh (its decode_ab, run_tests and sanitize helpers). Build only some: build-pending.sh base
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
out="$root/.device/pending"
work=/tmp/kvtrim-pending
mkdir -p "$out" "$work"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$out/"
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(base)

# build NAME DIFF TEST_FILTER CUDA_FLAGS TARGET... : binaries NAME's targets, gzipped into $out.
build() {
  local name=$1 diff=$2 filter=$3 flags=$4; shift 4
  local tree="$work/$name"
  git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  git worktree add -q --detach "$tree" HEAD
  [ -z "$diff" ] || git -C "$tree" apply "$root/docs/unverified/$diff"
  cmake --preset cuda -S "$tree" -B "$tree/build" -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DKVTRIM_CUDA_TEST_FILTER="$filter" -DCMAKE_CUDA_FLAGS="$flags" \
    ${KVTRIM_FLASHINFER_INCLUDE:+-DKVTRIM_FLASHINFER_INCLUDE=$KVTRIM_FLASHINFER_INCLUDE} > "$work/$name.configure.log"
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
    # FlashInfer's decode next to kvtrim's on the same pages (issue 11): its headers from scripts/peer-flashinfer.
    peer) [ -d "$root/.peers/flashinfer/include" ] || scripts/peer-flashinfer
        KVTRIM_FLASHINFER_INCLUDE="$root/.peers/flashinfer/include" build peer "" none "" bench_peer_flashinfer_decode ;;
    # main's codec tests (paged / flat codecs through the in-block plan): kvtrim_cuda_tests_codecs
    codecs) build codecs "" 'codecs_test' "" kvtrim_cuda_tests ;;
    # main (for A/Bs against a diff's variant): bench_cuda_decode_attention_main
    main) build main "" none "" bench_cuda_decode_attention ;;
    # main's decode, codec and eviction tests (a final run of what landed): kvtrim_cuda_tests_final
    final) build final "" "${FINAL_TESTS:-decode_test|codecs_test|eviction_test}" "" kvtrim_cuda_tests ;;
    # HEAD as it is (a branch under test): its codec and eviction tests and its decode bench
    head) build head "" 'codecs_test|eviction_test' "" kvtrim_cuda_tests
          build headbench "" none "" bench_cuda_decode_attention ;;
    # HEAD's decode bench alone (the base of an A/B whose tests another variant builds)
    headbench) build headbench "" none "" bench_cuda_decode_attention ;;
    # pre-rope-mma.diff (issue 12): pre-RoPE low-rank decode on the tensor cores; its codec tests and decode bench
    # (the base: `main`'s decode bench)
    prmma) build prmma pre-rope-mma.diff 'codecs_test' "" kvtrim_cuda_tests bench_cuda_decode_attention ;;
    *) echo "build-pending.sh: unknown variant $variant (base peer codecs main final head headbench prmma)" >&2; exit 2 ;;
  esac
done
du -sh "$out"
