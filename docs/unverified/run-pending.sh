#!/usr/bin/env bash
# The device run of pending work, from the binaries build-pending.sh packed in .device/pending (its header
# has the call). Stages, run in the order given:
#   sdpa     torch SDPA on W (any card: the peer of the decode rows)
#   h200     on an H200 only: issue 10's compress rows, torch's and kvpress's compress
#   flashinfer FlashInfer 0.7.4's paged decode and kvtrim's shared_paged decode on the same pages, two rounds (issue 11)
#   prof4k   ncu --set full of the tensor-core attention kernel at W's 4k for contiguous, flat and paged 16: the
#            details page and the per-SASS-instruction source counters of each (why paged pays ~5 µs more at 4k)
#   codecs   main's codec tests (build-pending.sh codecs): paged / flat int8 / int4 / fp8 / layered decode through
#            the in-block plan, then memcheck on the paged / flat CodecCache cases
#   profcodecs ncu --set full of the fragment kernel at W 32k for fp8, int8 and fp16 (issue 12: fp8 1.75x, int8 1.64x fp16)
#   rows     one build's layout and codec rows (ROWS_VARIANT, default main), two rounds
#   profint4 ncu --set full of the fragment kernel at W 32k for int4 and int4 zero points
#   flush    the rows and torch's under both L2 flushes (KVTRIM_BENCH_FLUSH memset / read)
#   compressflush issue 10's compress rows and torch's / kvpress's under both flushes (any card)
#   final    main's decode, codec and eviction tests with memcheck and racecheck
#   occupancy grid size, registers and occupancy limits of the tensor-core kernel in OCCUPANCY_VARIANTS (ncu)
#   headtests the branch under test (build-pending.sh head): codec and eviction tests, memcheck, racecheck
#   headbench its bench against main and ncu's occupancy of the low-rank kernel
#   codecrows every codec row (W, codec_shapes_* at 4k and 32k) of the benches CODEC_VARIANTS names, three rounds
#   codectests the codec and eviction tests of CODEC_TESTS (default final), memcheck and racecheck on fragment kernels
#   prmma    pre-rope-mma.diff: codec tests, memcheck, racecheck, pre-RoPE decode rows against main's, ncu
#   diag     main's decode: flat 4k, paged unscattered, and ncu's time of each kernel (plan, attention, merge) at 4k
#            for contiguous, flat and paged (where paged's extra time at 4k goes)
# A diff's stages use run_tests (its test binary), sanitize (compute-sanitizer) and decode_ab (bench A/B).
# A stage is a shell function: never name one after a command its helpers call (a stage `head` once shadowed
# the `head` that run_tests pipes into and re-ran the tests until the call timed out).
# Everything it prints goes to $OUT/log.txt, the raw outputs next to it.
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo/.device/pending" || exit 1
for f in *.gz; do [ -e "${f%.gz}" ] || gunzip -kf "$f"; done
chmod +x bench_* kvtrim_* 2>/dev/null
export LD_LIBRARY_PATH="$PWD:${LD_LIBRARY_PATH:-}"
name=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); echo "$name" | tee -a "$OUT/gpu.txt"
S=$SECONDS
log() { echo "$*" | tee -a "$OUT/log.txt"; }
# Each row's median across the given outputs, one line a row (W's shape left out of the names); rows
# matching $ROWS (default: kvtrim's own benches).
table() {
  # median_us (the rows' own counter; the second column is Google Benchmark's mean), else the time column
  grep -hE "${ROWS:-^(compress|device_copy|select|decode)}" "$@" |
    awk '{m = $2; for (i = 3; i <= NF; ++i) if ($i ~ /^median_us=/) m = substr($i, 11); print $1, m}' |
    sed -E 's/batch:8.kv_heads:8.tokens:32768.q_heads:32.head_dim:128.//; s/q_heads:32.kv_heads:8.head_dim:128.//; s/.iterations:[0-9]+.manual_time//' |
    sort -s -k1,1 | awk '{a[$1]=a[$1]" "$2} END {for (k in a) print k, a[k]}' | sort
}
run_tests() {  # label seconds [gtest filter]: kvtrim_cuda_tests_<label> in 8 shards at once (the CPU reference
  # is the slow part: one process got through 28 decode tests in 110 s, 8 shards through 160 in ~140 s)
  local filter=(); [ -z "${3:-}" ] || filter=(--gtest_filter="$3")
  local pids=() i
  for i in 0 1 2 3 4 5 6 7; do
    GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout "$2" "./kvtrim_cuda_tests_$1" "${filter[@]}" > "$OUT/tests-$1-$i.txt" 2>&1 &
    pids+=($!)
  done
  # Each shard's exit status (124: its time ran out; a crash prints no FAILED line) and its PASSED count;
  # the total is checked against the binary's own list.
  local codes=() passed=0 listed
  for i in 0 1 2 3 4 5 6 7; do
    wait "${pids[i]}"; codes+=($?)
    passed=$((passed + $(grep -oE '^\[  PASSED  \] [0-9]+' "$OUT/tests-$1-$i.txt" | grep -oE '[0-9]+$' || echo 0)))
  done
  listed=$("./kvtrim_cuda_tests_$1" "${filter[@]}" --gtest_list_tests | grep -c '^  ')
  log "tests $1 ${3:-} $((SECONDS - S))s: $passed of $listed passed; shard rc ${codes[*]}"
  grep -h 'FAILED  \] .*(' "$OUT"/tests-$1-*.txt | head -20 | tee -a "$OUT/log.txt"
}
sanitize() {  # tool binary filter label
  timeout "${SANITIZE_SECONDS:-150}" compute-sanitizer --tool "$1" "./$2" --gtest_filter="$3" > "$OUT/$1-$4.txt" 2>&1
  log "$1 $4 rc=$? $((SECONDS - S))s $(grep -hE 'RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED' "$OUT/$1-$4.txt" | tr '\n' ' ')"
}

DECODE_ROWS='device_copy|^decode_attention/batch:8/tokens:32768/q_heads:32/kv_heads:8/head_dim:128/it|^decode_attention_paged/batch:8/tokens:(4096|32768)/.*lengths:0/page:(16|64)/scattered:1|^decode_attention_paged/batch:8/tokens:32768/.*lengths:2/page:16/scattered:1|^decode_attention_shared_paged/batch:8/tokens:(4096|32768)/.*page:16/hnd:0/scattered:1|^decode_attention_shared_paged/batch:8/tokens:32768/.*page:(16|64)/hnd:1/scattered:1|^decode_attention_flat/batch:8/tokens:32768/.*lengths:0'

# decode_ab LABEL VARIANT...: the decode rows of each built bench_cuda_decode_attention_VARIANT, $ROUNDS (default
# two) rounds alternating.
decode_ab() {
  local label=$1; shift
  for r in $(seq "${ROUNDS:-2}"); do for v in "$@"; do
    [ -e bench_cuda_decode_attention_$v ] && timeout 80 ./bench_cuda_decode_attention_$v --benchmark_filter="$DECODE_ROWS" > "$OUT/$label-$v-$r.txt" 2>&1
  done; done
  log "$label $((SECONDS - S))s"
  for v in "$@"; do echo "== $label $v"; table "$OUT"/$label-$v-*.txt; done | tee -a "$OUT/log.txt"
}
h200() {
  case "$name" in *H200*) ;; *) log "not an H200: h200 stage skipped"; return;; esac
  for r in 1 2; do
    timeout 90 ./bench_cuda_compress_base --benchmark_filter='device_copy|^compress/(snapkv|retrieval_head)/[a-z_]+/(contiguous|flat|paged)/(given_lse/)?batch' > "$OUT/compress-$r.txt" 2>&1
    log "compress $r rc=$? $((SECONDS - S))s"
  done
  table "$OUT"/compress-*.txt | tee -a "$OUT/log.txt"
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
  (cd "$repo" && timeout 150 python3 bench/torch_compress.py --kvpress-wheel .whl/kvpress-0.5.4-py3-none-any.whl) > "$OUT/torch_compress.txt" 2>&1
  log "torch_compress rc=$? $((SECONDS - S))s"; grep -E '"row"|median_us' "$OUT/torch_compress.txt" | paste - - | tee -a "$OUT/log.txt"
}
sdpa() {  # torch SDPA on W's contiguous cache (issue 11's peer), on any card
  python3 -c "import torch; print(torch.__version__)" >> "$OUT/gpu.txt" 2>&1
  (cd "$repo" && timeout 60 python3 bench/torch_sdpa.py) > "$OUT/torch_sdpa.txt" 2>&1
  log "torch_sdpa rc=$? $((SECONDS - S))s"; grep -E '"tokens"|median_us|"head_dim"' "$OUT/torch_sdpa.txt" | paste - - - | tee -a "$OUT/log.txt"
}
# Every layout at 4k / 8k / 32k, the codecs and the metric: the rows a decode change's A/B wants
# (DECODE_ROWS="$LAYOUT_ROWS" decode_ab LABEL base VARIANT).
LAYOUT_ROWS='device_copy|^decode_attention/batch:8/tokens:(4096|32768)/q_heads:32/kv_heads:8/head_dim:128/it|^decode_attention_(paged|flat)/batch:8/tokens:(4096|8192|32768)/.*page:(0|16|64)/scattered:(0|1)|^decode_attention_shared_paged/batch:8/tokens:(4096|32768)/.*page:16/hnd:0/scattered:1|^codec_decode_(int8|fp8)/batch:8/tokens:32768/q_heads:32/|^decode_attention_metric'
flashinfer() {
  for r in 1 2; do
    timeout 120 ./bench_peer_flashinfer_decode_peer > "$OUT/flashinfer-$r.txt" 2>&1
    log "flashinfer $r rc=$? $((SECONDS - S))s"
  done
  ROWS='^(flashinfer|kvtrim)' table "$OUT"/flashinfer-*.txt | tee -a "$OUT/log.txt"
  grep -h "check failed\|beyond" "$OUT"/flashinfer-*.txt | head -3 | tee -a "$OUT/log.txt"
}
diag() {
  ROUNDS=1 DECODE_ROWS='device_copy|^decode_attention/batch:8/tokens:4096/q_heads:32/kv_heads:8/head_dim:128/it|^decode_attention_(paged|flat)/batch:8/tokens:(4096|32768)/.*lengths:0/page:(0|16)/scattered:(0|1)' \
    decode_ab diag main
  local rows=('^decode_attention/batch:8/tokens:4096/q_heads:32/kv_heads:8/head_dim:128/it'
    '^decode_attention_flat/batch:8/tokens:4096/' '^decode_attention_paged/batch:8/tokens:4096/.*page:16/scattered:1'
    '^decode_attention_paged/batch:8/tokens:32768/.*lengths:0/page:16/scattered:1' '^decode_attention_flat/batch:8/tokens:32768/.*lengths:0/')
  local i=0
  for row in "${rows[@]}"; do
    i=$((i + 1))
    timeout 90 ncu --clock-control none --metrics gpu__time_duration.sum --launch-skip 30 --launch-count 12 \
      -k 'regex:plan_decode|decode_attention|merge_decode' --print-summary per-kernel \
      ./bench_cuda_decode_attention_main --benchmark_filter="$row" > "$OUT/ncu-$i.txt" 2>&1
    log "ncu $row rc=$? $((SECONDS - S))s"
    grep -E '^  [^ ]|gpu__time_duration' "$OUT/ncu-$i.txt" | sed -E 's/[<(].*//; s/.*:://' | paste - - | awk '{print $1, "min/max/avg us", $(NF-2), $(NF-1), $NF}' | tee -a "$OUT/log.txt"
  done
}
codecs() {
  run_tests codecs 80
  sanitize memcheck kvtrim_cuda_tests_codecs '*CodecCache.*paged*:*CodecCache.*flat*' codecs
}
# profile NAME ROW [VARIANT]: ncu --set full of the tensor-core attention kernel in one launch of bench row ROW
# (bench_cuda_decode_attention_VARIANT, default main): the details page and the per-SASS source counters.
profile() {
  local bench=./bench_cuda_decode_attention_${3:-main}
  timeout 90 ncu --set full --clock-control none --import-source no --launch-skip 5 --launch-count 1 \
    -k 'regex:decode_attention_tensor_core' -o "$OUT/prof-$1" "$bench" --benchmark_filter="$2" > "$OUT/prof-$1-run.txt" 2>&1
  log "prof $1 rc=$? $((SECONDS - S))s"
  ncu -i "$OUT/prof-$1.ncu-rep" --page details > "$OUT/prof-$1-details.txt" 2>&1
  ncu -i "$OUT/prof-$1.ncu-rep" --page source --csv --print-source sass > "$OUT/prof-$1-sass.csv" 2>&1
  rm -f "$OUT/prof-$1.ncu-rep"
  grep -E 'Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Eligible Warps|No Eligible|Warp Cycles Per Issued' \
    "$OUT/prof-$1-details.txt" | head -12 | tee -a "$OUT/log.txt"
}
prof4k() {  # contiguous, flat and paged 16 at W 4k (where paged's remaining time goes)
  profile contiguous '^decode_attention/batch:8/tokens:4096/q_heads:32/kv_heads:8/head_dim:128/it'
  profile flat '^decode_attention_flat/batch:8/tokens:4096/.*lengths:0/'
  profile paged '^decode_attention_paged/batch:8/tokens:4096/.*lengths:0/page:16/scattered:1'
}
rows() {  # one build's layout and codec rows (bench_cuda_decode_attention_$ROWS_VARIANT, default main), two rounds
  ROUNDS=${ROUNDS:-2} DECODE_ROWS="$LAYOUT_ROWS|^codec_decode_" decode_ab rows "${ROWS_VARIANT:-main}"
  echo "== codecs" | tee -a "$OUT/log.txt"; ROWS='^codec_decode_' table "$OUT"/rows-*.txt | tee -a "$OUT/log.txt"
}
profcodecs() {  # the fragment kernel at W 32k: fp8 (1.75x fp16 on 2026-12-07, goal 1.8x) and int8 (1.64x), and fp16
  profile fp8 '^codec_decode_fp8/batch:8/tokens:32768/q_heads:32/'
  profile int8 '^codec_decode_int8/batch:8/tokens:32768/q_heads:32/'
  profile fp16 '^codec_decode_fp16/batch:8/tokens:32768/q_heads:32/'
}
profint4() {  # the fragment kernel at W 32k for int4 and int4 zero points (issue 12: issue-bound; 2.03x / 1.92x fp16 on 2026-12-07)
  profile int4 '^codec_decode_int4/batch:8/tokens:32768/q_heads:32/'
  profile int4zp '^codec_decode_int4_zero_point/batch:8/tokens:32768/q_heads:32/'
}
# The L2 flush's share of every ratio: the same binary's rows and torch's under KVTRIM_BENCH_FLUSH=memset
# (the method before 2026-12-07: ~50 MB left dirty in the L2) and =read (clean lines), alternating, two rounds.
FLUSH_ROWS='device_copy|^decode_attention/batch:8/tokens:(4096|32768)/q_heads:32/kv_heads:8/head_dim:128/it|^decode_attention_paged/batch:8/tokens:(4096|32768)/.*lengths:0/page:16/scattered:1|^decode_attention_flat/batch:8/tokens:(4096|32768)/|^decode_attention_shared_paged/batch:8/tokens:(4096|32768)/.*page:16/hnd:0/scattered:1|^codec_decode_[a-z0-9_]+/batch:8/tokens:32768/q_heads:32/|^decode_attention_metric/batch:8/tokens:32768'
flush() {
  local r mode
  for r in 1 2; do for mode in memset read; do
    KVTRIM_BENCH_FLUSH=$mode timeout 150 ./bench_cuda_decode_attention_${FLUSH_VARIANT:-base} --benchmark_filter="$FLUSH_ROWS" > "$OUT/flush-$mode-$r.txt" 2>&1
    log "flush $mode $r rc=$? $((SECONDS - S))s"
  done; done
  for mode in memset read; do echo "== flush $mode"; table "$OUT"/flush-$mode-*.txt; ROWS='^codec_decode_' table "$OUT"/flush-$mode-*.txt; done | tee -a "$OUT/log.txt"
  for mode in memset read; do
    (cd "$repo" && KVTRIM_BENCH_FLUSH=$mode timeout 90 python3 bench/torch_sdpa.py) > "$OUT/torch_sdpa-$mode.txt" 2>&1
    log "torch_sdpa $mode rc=$? $((SECONDS - S))s"; grep -E '"tokens"|median_us|"head_dim"' "$OUT/torch_sdpa-$mode.txt" | paste - - - | tee -a "$OUT/log.txt"
    (cd "$repo" && KVTRIM_BENCH_FLUSH=$mode timeout 90 python3 bench/torch_codec_sdpa.py) > "$OUT/torch_codec-$mode.txt" 2>&1
    log "torch_codec_sdpa $mode rc=$? $((SECONDS - S))s"; grep -E '"codec"|median_us' "$OUT/torch_codec-$mode.txt" | paste - - | tee -a "$OUT/log.txt"
  done
}
# Issue 10's compress rows and torch's / kvpress's pipelines under both L2 flushes, on any card (the ratios the
# H200 stage measures, here on whatever card came).
compressflush() {
  local mode
  for mode in memset read; do
    KVTRIM_BENCH_FLUSH=$mode timeout 90 ./bench_cuda_compress_base --benchmark_filter='device_copy|^compress/(snapkv|retrieval_head)/[a-z_]+/(contiguous|flat|paged)/(given_lse/)?batch' > "$OUT/compress-$mode.txt" 2>&1
    log "compress $mode rc=$? $((SECONDS - S))s"
    (cd "$repo" && KVTRIM_BENCH_FLUSH=$mode timeout 150 python3 bench/torch_compress.py --kvpress-wheel .whl/kvpress-0.5.4-py3-none-any.whl) > "$OUT/torch_compress-$mode.txt" 2>&1
    log "torch_compress $mode rc=$? $((SECONDS - S))s"; grep -E '"row"|median_us' "$OUT/torch_compress-$mode.txt" | paste - - | tee -a "$OUT/log.txt"
  done
  for mode in memset read; do echo "== compress $mode"; table "$OUT"/compress-$mode.txt; done | tee -a "$OUT/log.txt"
}
# build-pending.sh final: main's decode, codec and eviction tests, memcheck on a cross-section, racecheck on two.
final() {
  run_tests final 200
  sanitize memcheck kvtrim_cuda_tests_final '*CodecCache*contiguous_int4_g32_b*:*CodecCache*paged_fp8*:*CodecCache*flat_int8*:*EvictionMetricCodecs*' final
  [ "${FINAL_RACECHECK:-0}" = 0 ] || sanitize racecheck kvtrim_cuda_tests_final '*CodecCache*contiguous_int4_g32_b*:*CodecCache*paged_fp8_amax_b2*' final
}
# launch_limits LABEL VARIANT KERNEL_REGEX ROW: ncu's grid size, registers, dynamic shared memory, occupancy limits
# and time of one launch of the matching kernel in bench_cuda_decode_attention_VARIANT's row, one log line.
launch_limits() {
  timeout 60 ncu --metrics launch__grid_size,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum \
    --launch-skip 20 --launch-count 1 -k "regex:$3" "./bench_cuda_decode_attention_$2" --benchmark_filter="$4" > "$OUT/occupancy-$1.txt" 2>&1
  log "occupancy $2 $4 rc=$? $(grep -E 'launch__|sm__warps|gpu__time' "$OUT/occupancy-$1.txt" | awk '{print $1 "=" $NF}' | sed 's/launch__//' | tr '\n' ' ')"
}
# Each build's tensor-core kernel at W 4k and 32k (fp16 contiguous, paged 16) and fp8 / int4 at 32k (does the smaller
# shared memory let a third block onto an SM, and so grow the grid?).
occupancy() {
  local rows=('^decode_attention/batch:8/tokens:4096/q_heads:32/kv_heads:8/head_dim:128/it'
    '^decode_attention/batch:8/tokens:32768/q_heads:32/kv_heads:8/head_dim:128/it'
    '^decode_attention_paged/batch:8/tokens:4096/.*lengths:0/page:16/scattered:1'
    '^codec_decode_fp8/batch:8/tokens:32768/q_heads:32/' '^codec_decode_int4/batch:8/tokens:32768/q_heads:32/')
  local v row i=0
  for v in ${OCCUPANCY_VARIANTS:-main headbench}; do for row in "${rows[@]}"; do
    i=$((i + 1)); launch_limits "$i" "$v" decode_attention_tensor_core "$row"
  done; done
}
# build-pending.sh head (the branch under test: decode at two stages, low-rank r = 32 at two, EveryGroup turned):
# codec and eviction tests, memcheck on the low-rank and head dim 128 int4 / fp8 codec cases, racecheck on two
# low-rank tensor-core cases; the bench against main (low-rank, codecs, layouts), two rounds; ncu's grid and
# occupancy of the low-rank kernel in both.
headtests() {
  run_tests head 300
  SANITIZE_SECONDS=200 sanitize memcheck kvtrim_cuda_tests_head '*CodecCache*low_rank_post*:*SequenceBasisCache*post*:*EveryGroup*int4*_d128*:*EveryGroup*fp8*_d128*:*EvictionStep*LowRank*' head
  SANITIZE_SECONDS=120 sanitize racecheck kvtrim_cuda_tests_head '*CodecCache*contiguous_low_rank_post_b2_kv2_g8_d128*:*CodecCache*paged_low_rank_post_b1_kv2_g16_d128*' head
}
headbench() {
  DECODE_ROWS="$LAYOUT_ROWS|^codec_decode_[a-z0-9_]+/batch:8/tokens:32768/" ROWS='^(device_copy|decode|codec_decode)' \
    decode_ab head main headbench
  local v row i=100
  for v in main headbench; do for row in '^codec_decode_low_rank/batch:8/tokens:32768/q_heads:32/' '^codec_decode_low_rank/batch:8/tokens:32768/q_heads:8/'; do
    i=$((i + 1)); launch_limits "$i" "$v" low_rank "$row"
  done; done
}
# Every codec row (W at GQA 4 / 2 / 1, codec_shapes_* at GQA 8 / 16 and head dim 64, 32k and 4k) of the benches
# CODEC_VARIANTS (bench_cuda_decode_attention_<variant>, e.g. "main headbench"), ROUNDS (default three) alternating;
# ncu's grid and occupancy of fp8 at W, int4 at GQA 8 and int8 at head dim 64 (CODEC_OCCUPANCY=0: not).
CODEC_ROWS='device_copy|^codec_(decode|shapes)_(fp16|int8|int8_zero_point|int4|int4_zero_point|fp8|fp8_fixed_scales)/batch:8/tokens:(4096|32768)/'
codecrows() {
  local r v row
  for r in $(seq "${ROUNDS:-3}"); do for v in ${CODEC_VARIANTS:?codecrows: name the benches to compare}; do
    timeout 150 ./bench_cuda_decode_attention_$v --benchmark_filter="$CODEC_ROWS" > "$OUT/codecrows-$v-$r.txt" 2>&1
    log "codecrows $v $r rc=$? $((SECONDS - S))s"
  done; done
  for v in ${CODEC_VARIANTS:?codecrows: name the benches to compare}; do echo "== codecrows $v"; ROWS='^(device_copy|codec_)' table "$OUT"/codecrows-$v-*.txt; done | tee -a "$OUT/log.txt"
  [ "${CODEC_OCCUPANCY:-1}" = 1 ] || return 0
  local i=200
  for v in ${CODEC_VARIANTS:?codecrows: name the benches to compare}; do for row in '^codec_decode_fp8/batch:8/tokens:32768/q_heads:32/' \
      '^codec_shapes_int4/batch:8/tokens:32768/q_heads:64/kv_heads:8/head_dim:128/' '^codec_shapes_int8/batch:8/tokens:32768/q_heads:32/kv_heads:8/head_dim:64/'; do
    i=$((i + 1)); launch_limits "$i" "$v" decode_attention_tensor_core "$row"
  done; done
}
# The codec and eviction tests of CODEC_TESTS (kvtrim_cuda_tests_<label>; default final: build-pending.sh final with
# FINAL_TESTS='codecs_test|eviction_test'), memcheck on the code-fragment kernels at head dim 64 (by group: gtest's
# filters take * and ? only), int4 at GQA 8 and 128, the int8 / int4 GQA 16 cases (the decoders' parity rule) and
# the metric over codecs (low-rank and layered, not fragments, left out), racecheck on three of them.
codectests() {
  local label=${CODEC_TESTS:-final}
  run_tests "$label" 300
  SANITIZE_SECONDS=240 sanitize memcheck "kvtrim_cuda_tests_$label" "${CODEC_MEMCHECK:-*CodecCache*_g1_d64*:*CodecCache*_g2_d64*:*CodecCache*_g4_d64*:*CodecCache*_g8_d64*:*CodecCache*int4*_g8_d128*:*CodecCache*int8*_g16_*:*CodecCache*int4*_g16_*:*EvictionMetricCodecs*-*low_rank*:*layered*}" "$label"
  SANITIZE_SECONDS=150 sanitize racecheck "kvtrim_cuda_tests_$label" "${CODEC_RACECHECK:-*EveryGroup*int8_g32_b1_kv3_g2_d64*:*EveryGroup*int4_g32_zero_b1_kv3_g8_d64*:*EveryGroup*int4_g32_b*_g8_d128*}" "$label"
}
# pre-rope-mma.diff (build-pending.sh prmma main): codec tests (every pre-RoPE case at stored rank 16 / 32 / 64 now on
# the tensor cores; ranks 20 and 29 on the CUDA cores) with memcheck and racecheck beside them, then the pre-RoPE and
# post-RoPE decode rows against main's, two rounds, and ncu's summary of the new kernel.
prmma() {
  SANITIZE_SECONDS=270 sanitize memcheck kvtrim_cuda_tests_prmma '*RopeSincos*:*CodecCache*low_rank*:*SequenceBasisCache*seq_pre*' prmma &
  SANITIZE_SECONDS=270 sanitize racecheck kvtrim_cuda_tests_prmma '*CodecCache*contiguous_low_rank_pre_b1_kv2_g4_d128*:*CodecCache*contiguous_low_rank_pre_interleaved*:*CodecCache*paged_low_rank_pre_b1_kv2_g16_d64*' prmma &
  run_tests prmma 240
  wait
  local r v
  for r in 1 2; do for v in main prmma; do
    timeout 120 ./bench_cuda_decode_attention_$v --benchmark_filter='device_copy|^codec_decode_(fp16|low_rank|low_rank_pre_rope)/batch:8/tokens:32768/q_heads:32/' > "$OUT/prmma-$v-$r.txt" 2>&1
    log "prmma bench $v $r rc=$? $((SECONDS - S))s"
  done; done
  for v in main prmma; do echo "== $v"; ROWS='^(device_copy|codec_)' table "$OUT"/prmma-$v-*.txt; done | tee -a "$OUT/log.txt"
  timeout 150 ncu --clock-control none -k regex:decode_attention_low_rank --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section InstructionStats --section Occupancy --section LaunchStats \
    ./bench_cuda_decode_attention_prmma --benchmark_filter='^codec_decode_low_rank_pre_rope/' > "$OUT/prmma-ncu.txt" 2>&1
  grep -E 'Duration|Registers Per|Executed Instructions  |Theoretical Occupancy|Warp Cycles Per Issued|Throughput' "$OUT/prmma-ncu.txt" | tee -a "$OUT/log.txt"
}
# DEADLINE (seconds since the start): stages that would begin after it are skipped, so the archive below
# is still made within the call's limit.
for stage in "$@"; do
  if [ -n "${DEADLINE:-}" ] && [ $((SECONDS - S)) -ge "$DEADLINE" ]; then log "skipped $stage: past DEADLINE"; continue; fi
  "$stage"
done
log "done $((SECONDS - S))s"
# Only a few files come back from a device call: the raw outputs travel as one archive next to log.txt.
(cd "$OUT" && find . -maxdepth 1 -type f ! -name log.txt ! -name gpu.txt ! -name raw.tar.gz -printf '%f\n' > .raw-list &&
  tar czf raw.tar.gz -T .raw-list && xargs rm -f < .raw-list; rm -f .raw-list)
