#!/usr/bin/env bash
# tools/fidelity/device-run.sh — the fidelity study in one call on the GPU machine
# (docs/fidelity.md): builds the Python package, trains the model, runs the study.
#
#   scripts/device-python stage                  # once: Eigen / nlohmann-json headers into .deps/
#   run(command="tools/fidelity/device-run.sh", carry=[".deps"])
#
# The package builds (CPU cores) while the model trains (GPU), then the study
# runs with the package. Results in $OUT: fidelity.json (the study), train.json,
# logs, and fidelity.tgz holding them all (a device call brings back few files).
# Knobs (environment): FIDELITY_STEPS (training steps; train.py's default 1800),
# FIDELITY_SAMPLES (examples per task, 24), FIDELITY_QUICK=1 (two kept fractions), KVTRIM_CUDA
# (ON: the CUDA backend too — every setup whose scheme CUDA compiles also runs on the GPU and
# its kept sets and metrics are compared with the CPU's; a failed CUDA build falls back to the
# CPU backend), FIDELITY_TRAIN_SECONDS (a guard that stops training early, recorded in
# train.json; default: none), FIDELITY_TRAIN_ARGS (more train.py arguments: --tiny for a CPU
# smoke run), FIDELITY_SITE (a kvtrim package built before, e.g. here for the GPU machine's
# Python 3.12: used if it imports there, else the package is built), FIDELITY_SOURCE (the
# checkout to build from when it must, default the repository), FIDELITY_DEADLINE (seconds
# from the start by which the study must end: it is stopped then, keeping the tasks it
# finished; default: none), FIDELITY_CHECKS (pytest arguments, run from python/tests while the
# model trains, once the package is there; e.g. "test_cuda.py test_codecs.py"),
# FIDELITY_DEMO=1 (also the demo's GPU part, examples/python/demo_gpu.py, while the model trains),
# FIDELITY_STUDY_ARGS (more study.py arguments, e.g. "--prefix 256 --no-eviction" for a smoke run;
# "--tasks needle,aware --merge F" to run some tasks and keep an earlier call's rows of the others),
# FIDELITY_REUSE_MODEL=1 (a warm machine that trained the model in an earlier call: no training; with
# FIDELITY_SITE=/tmp/fidelity-site no build either — a study split over calls of under 10 minutes each).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="$(dirname "$here")"
repo="${KVTRIM_REPO:-$(cd "$tools/.." && pwd)}"
out="${OUT:-device-out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
model="${FIDELITY_MODEL:-$repo/.model}"
site=/tmp/fidelity-site
export PYTHONUNBUFFERED=1 PATH="/usr/local/cuda/bin:$PATH"
if [ -d "$repo/.deps/usr" ]; then
  export CMAKE_PREFIX_PATH="$repo/.deps/usr"
elif [ -f "$here/deps.tgz" ]; then  # staged next to this script (a copy outside the checkout)
  mkdir -p /tmp/fidelity-deps && tar xzf "$here/deps.tgz" -C /tmp/fidelity-deps
  export CMAKE_PREFIX_PATH=/tmp/fidelity-deps/usr
fi
started=$SECONDS
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

build() {
  rm -rf "$site"
  (cd "${FIDELITY_SOURCE:-$repo}" && KVTRIM_CUDA="$1" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip install \
    --no-build-isolation --no-deps --target "$site" -C build-dir=/tmp/fidelity-build/{wheel_tag} -v . \
    >"$out/build-$1.log" 2>&1)
}
if [ -n "${FIDELITY_SITE:-}" ] && PYTHONPATH="$FIDELITY_SITE" python3 -c "import kvtrim" 2>"$out/site-import.log"; then
  site="$FIDELITY_SITE"  # a package built before: no build
  echo 0 >"$out/build.rc"
  builder=
else
  [ -n "${FIDELITY_SITE:-}" ] && { echo "the staged package does not import here: building it"; cat "$out/site-import.log"; }
  (
    build "${KVTRIM_CUDA:-ON}" || { [ "${KVTRIM_CUDA:-ON}" = ON ] && build OFF; }
    echo $? >"$out/build.rc"
  ) &
  builder=$!
fi

# While the model trains (and beside the study if the build ends later): the package's tests and
# the demo's GPU part, once the package is there.
(
  while [ ! -s "$out/build.rc" ]; do sleep 2; done
  [ "$(cat "$out/build.rc")" -eq 0 ] || exit 0
  if [ -n "${FIDELITY_CHECKS:-}" ]; then
    (cd "${FIDELITY_TESTS:-$repo/python/tests}" && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout 200 python3 -m pytest -q -rs \
      ${FIDELITY_CHECKS} >"$out/pytest.log" 2>&1; echo "pytest exit $?" >>"$out/pytest.log")
    tail -4 "$out/pytest.log"
  fi
  if [ -n "${FIDELITY_DEMO:-}" ]; then
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout 60 python3 "${FIDELITY_DEMO_SCRIPT:-$repo/examples/python/demo_gpu.py}" \
      >"$out/demo.log" 2>&1
    echo "demo exit $?" >>"$out/demo.log"
    cat "$out/demo.log"
  fi
) &
checker=$!

if [ -n "${FIDELITY_REUSE_MODEL:-}" ] && [ -s "$model/train.json" ]; then
  echo "reusing the model trained by an earlier call on this machine: $model"  # (a study split over calls)
  trained=0
else
  python3 "$tools/model/train.py" --out "$model" ${FIDELITY_STEPS:+--steps "$FIDELITY_STEPS"} \
    --max-seconds "${FIDELITY_TRAIN_SECONDS:-1e9}" ${FIDELITY_TRAIN_ARGS:-} 2>&1 | tee "$out/train.log"
  trained=${PIPESTATUS[0]}
fi
cp "$model/train.json" "$out/" 2>/dev/null
[ -n "$builder" ] && wait $builder
echo "train: exit $trained; build: exit $(cat "$out/build.rc"), $((SECONDS - started)) s so far"

studied=1
if [ "$trained" -eq 0 ] && [ "$(cat "$out/build.rc")" -eq 0 ]; then
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import kvtrim; print('kvtrim', kvtrim.__version__, 'has_cuda', kvtrim.has_cuda, len(kvtrim.schemes()), 'schemes')"
  left=$(( ${FIDELITY_DEADLINE:-100000} - SECONDS ))  # the study stops before the call's own limit; what it finished stays
  [ "$left" -gt 10 ] || left=10  # (timeout 0 would mean no limit)
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" timeout "$left" python3 "$tools/fidelity/study.py" --model "$model" --out "$out/fidelity.json" \
    --samples "${FIDELITY_SAMPLES:-24}" ${FIDELITY_QUICK:+--quick} ${FIDELITY_DEADLINE:+--deadline $((left - 15))} \
    ${FIDELITY_STUDY_ARGS:-} \
    2>&1 | tee "$out/study.log"
  studied=${PIPESTATUS[0]}
else
  tail -30 "$out"/build-*.log
fi
wait $checker  # pytest and the demo (they may still run beside the study when the package was built here)
echo "study: exit $studied, $((SECONDS - started)) s in all"
(cd "$out" && tar czf fidelity.tgz --exclude fidelity.tgz ./*)
exit $((trained || studied))
