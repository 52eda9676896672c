#!/usr/bin/env bash
# The device run of the pending docs/unverified diffs, from the binaries build-pending.sh packed in
# .device/pending (its header has the call). Stages, run in the order given:
#   pmtests  paged-tensor-maps: decode, shared_paged and eviction tests
#   pmab     decode A/B, main against paged-tensor-maps (paged, shared_paged, flat and contiguous rows)
#   sdpa     torch SDPA on W (any card: the peer of the decode rows)
#   h200     on an H200 only: issue 10's compress rows, torch's and kvpress's compress
#   pmsan    paged-tensor-maps under memcheck (paged cases) and racecheck (pages of 8 and 16)
#   tests    the select diffs' tests (budgets, contiguous pipeline)
#   ab       compress A/B: main, select-offsets-late, select-cluster-push, and select_resident under ncu
#   san      the select diffs under memcheck, racecheck and synccheck
#   l2ab     the tensor maps' L2 promotion: 256 (pm), 0 and 128 bytes
#   tc3ab    decode A/B, main against main with every tensor-core kernel at three blocks an SM (when built)
# Everything it prints goes to $OUT/log.txt, the raw outputs next to it.
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo/.device/pending" || exit 1
for f in *.gz; do [ -e "${f%.gz}" ] || gunzip -kf "$f"; done
chmod +x bench_* kvtrim_* 2>/dev/null
export LD_LIBRARY_PATH="$PWD:${LD_LIBRARY_PATH:-}"
name=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); echo "$name" | tee -a "$OUT/gpu.txt"
S=$SECONDS
log() { echo "$*" | tee -a "$OUT/log.txt"; }
summary() { grep -E '^\[  (PASSED|FAILED) |FAILED  \]|tests? ran' "$1" | head -"${2:-12}" | tee -a "$OUT/log.txt"; }
# Medians of each row across the given outputs, one line a row (W's shape left out of the names).
table() {
  grep -hE '^(compress|device_copy|select|decode)' "$@" | awk '{print $1, $2}' |
    sed -E 's/batch:8.kv_heads:8.tokens:32768.q_heads:32.head_dim:128.//; s/q_heads:32.kv_heads:8.head_dim:128.//; s/.iterations:[0-9]+.manual_time//' |
    sort -s -k1,1 | awk '{a[$1]=a[$1]" "$2} END {for (k in a) print k, a[k]}' | sort
}
run_tests() {  # label seconds: kvtrim_cuda_tests_<label>, its summary in the log
  timeout "$2" "./kvtrim_cuda_tests_$1" > "$OUT/tests-$1.txt" 2>&1; log "tests $1 rc=$? $((SECONDS - S))s"
  summary "$OUT/tests-$1.txt" 20
}
sanitize() {  # tool binary filter label
  timeout 150 compute-sanitizer --tool "$1" "./$2" --gtest_filter="$3" > "$OUT/$1-$4.txt" 2>&1
  log "$1 $4 rc=$? $((SECONDS - S))s $(grep -hE 'RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED' "$OUT/$1-$4.txt" | tr '\n' ' ')"
}

DECODE_ROWS='device_copy|^decode_attention/batch:8/tokens:32768/q_heads:32/kv_heads:8/head_dim:128/it|^decode_attention_paged/batch:8/tokens:(4096|32768)/.*lengths:0/page:(16|64)/scattered:1|^decode_attention_paged/batch:8/tokens:32768/.*lengths:2/page:16/scattered:1|^decode_attention_shared_paged/batch:8/tokens:(4096|32768)/.*page:16/hnd:0/scattered:1|^decode_attention_shared_paged/batch:8/tokens:32768/.*page:(16|64)/hnd:1/scattered:1|^decode_attention_flat/batch:8/tokens:32768/.*lengths:0'
COMPRESS_ROWS='device_copy|^select_top_k/|^compress/snapkv/uniform/contiguous/(given_lse/)?batch|^compress/snapkv/adaptive/flat/batch:8/kv_heads:8|^compress/retrieval_head/by_scorer/paged/batch'
SELECT_CASES='sizes/budgets.select_top_k_matches_cpu/b3_h8_t4097:sizes/budgets.select_top_k_matches_cpu/b3_h8_t32768:sizes/budgets.select_top_k_matches_cpu/b2_h32_t4097:sizes/budgets.select_top_k_matches_cpu/b2_h32_t32768:sizes/budgets.select_top_k_matches_cpu/b32_h32_t17:sizes/budgets.select_top_k_matches_cpu/b33_h32_t17:sizes/budgets.select_top_k_matches_cpu/b2_h3_t40960:sizes/budgets.select_top_k_matches_cpu/b1_h1_t32768'
PAGED_CASES='AwkwardLengths/EvictionMetric.MatchesCpuReferenceFp16/paged_b2_kv2_g4_d128_n4097_w64_5:AwkwardLengths/DecodeAttention.MatchesCpuReferenceFp16/*paged*:SpeculativeTokens/MultiQueryDecode.MatchesCpuReferenceFp16/*paged*:*SharedPagedDecode*:DecodeAttentionTensorMaps.*'

pmtests() {
  run_tests pm 240
}
# decode_ab LABEL VARIANT...: the decode rows of each built bench_cuda_decode_attention_VARIANT, two rounds alternating.
decode_ab() {
  local label=$1; shift
  for r in 1 2; do for v in "$@"; do
    [ -e bench_cuda_decode_attention_$v ] && timeout 80 ./bench_cuda_decode_attention_$v --benchmark_filter="$DECODE_ROWS" > "$OUT/$label-$v-$r.txt" 2>&1
  done; done
  log "$label $((SECONDS - S))s"
  for v in "$@"; do echo "== $label $v"; table "$OUT"/$label-$v-*.txt; done | tee -a "$OUT/log.txt"
}
pmab() { decode_ab pmab base pm; }
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
pmsan() {
  sanitize memcheck kvtrim_cuda_tests_pm "$PAGED_CASES" pm
  sanitize racecheck kvtrim_cuda_tests_pm 'AwkwardLengths/DecodeAttention.MatchesCpuReferenceFp16/*paged*p8*:AwkwardLengths/DecodeAttention.MatchesCpuReferenceFp16/*paged_b2_kv4_g4*:*SharedPagedDecode*hnd_b2_kv4*' pm
}
tests() {
  for v in late push; do run_tests $v 120; done
}
ab() {
  for r in 1 2; do for v in base late push; do
    timeout 60 ./bench_cuda_compress_$v --benchmark_filter="$COMPRESS_ROWS" > "$OUT/compress-ab-$v-$r.txt" 2>&1
  done; done
  log "ab $((SECONDS - S))s"
  for v in base late push; do echo "== compress $v"; table "$OUT"/compress-ab-$v-*.txt; done | tee -a "$OUT/log.txt"
  for v in base late push; do
    timeout 40 ncu --csv --clock-control none --metrics gpu__time_duration.sum -k regex:'select_resident|copy_rows' -c 20 \
      ./bench_cuda_compress_$v --benchmark_filter='^compress/snapkv/uniform/contiguous/given_lse/batch' > "$OUT/ncu-$v.csv" 2>/dev/null
  done
  python3 - "$OUT" <<'PY' | tee -a "$OUT/log.txt"
import collections, csv, sys
for v in ['base', 'late', 'push']:
    try:
        rows = [r for r in csv.reader(open(f'{sys.argv[1]}/ncu-{v}.csv')) if len(r) > 10]
    except OSError:
        rows = []
    if not rows:
        print('ncu', v, 'none'); continue
    k, m = rows[0].index('Kernel Name'), rows[0].index('Metric Value')
    times = collections.defaultdict(list)
    for r in rows[1:]:
        times[r[k].split('(')[0].split('<')[0].replace('void kvtrim::', '')[:40]].append(float(r[m].replace(',', '')) / 1000)
    print('ncu', v, ' '.join(f'{n}={sorted(t)[len(t) // 2]:.2f}us(n{len(t)})' for n, t in times.items()))
PY
}
san() {
  for v in late push; do for tool in memcheck racecheck synccheck; do
    sanitize $tool kvtrim_cuda_tests_$v "$SELECT_CASES" $v
  done; done
}
l2ab() { decode_ab l2ab pm l2_0 l2_128; }
tc3ab() { decode_ab tc3ab base tc3; }
for stage in "$@"; do "$stage"; done
log "done $((SECONDS - S))s"
