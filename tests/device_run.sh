#!/usr/bin/env bash
# The GPU measurements of `make bench-gpu`, on the lent GPU machine, in calls that fit its limits (README:
# "Measuring on a GPU machine", under "Tests"). Run from the repository root with the kit built by
# `make device-kit` carried along:
#
#   tests/device_run.sh check    imports and one CUDA step of every stage's library (seconds)
#   tests/device_run.sh stages   full-size fixtures built on the GPU, then the stage table   (one call, <= 10 min)
#   tests/device_run.sh serve    the Serve figures on the fixtures the stages call left     (the next call;
#                                exits 3 at once where they are gone: a machine given back keeps nothing;
#                                CONTROLNET=1 adds the standard request with a canny unit, last)
#
# What a call writes under $OUT comes back; the fixtures, compile caches and the unpacked kit stay in .devenv/
# (ignored by git, so the machine keeps them between calls while it stays warm).
set -euo pipefail
phase=${1:-stages}
root=$(pwd)
kit="$root/.devenv"
out=${OUT:-$kit/out}
mkdir -p "$out"
python=${PYTHON:-python3}
# Unpacked once per kit: a warm machine keeps the folder, and a kit carried anew (newer than the stamp) replaces it.
if [ ! -f "$kit/site/.unpacked" ] || [ "$kit/site.tar.xz" -nt "$kit/site/.unpacked" ]; then
    rm -rf "$kit/site"  # Python's own xz, in case the image lacks the xz tool
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
        "$kit/site.tar.xz" "$kit"
    touch "$kit/site/.unpacked"
fi
export PYTHONPATH="$kit/site:$root${PYTHONPATH:+:$PYTHONPATH}"
export FULLSIZE_MODELS="$kit/models" MODEL_CACHE_DIR="$kit/cache"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
# Each phase stops short of the device's 600 s per call, so that its tail, its JSON and its logs still come back.
limit=${LIMIT:-570}

# Everything a phase prints goes to its log under $OUT; the reply carries the end: the table.
case "$phase" in
    check)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
            | tee "$out/gpu.csv" || echo "no nvidia-smi here"
        "$python" -m tests.device_check 2>&1 | tee "$out/check.log"
        ;;
    stages)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
        timeout "$limit" "$python" -m tests.bench_gpu --out "$out/bench-gpu.json" --budget "${BUDGET:-240}" ${QUICK:+--quick} \
            ${SHRINK:+--shrink --models "$kit/models-shrunk"} \
            > "$out/bench-gpu.log" 2>&1 || status=$?
        df -h "$kit" >> "$out/bench-gpu.log"
        tail -40 "$out/bench-gpu.log"
        grep -E "ERROR|Traceback|Error:" "$out/bench-gpu.log" | tail -5 || true
        exit "${status:-0}"
        ;;
    serve)
        timeout "$limit" "$python" -m tests.bench_gpu_serve --out "$out/bench-gpu-serve.json" --budget "${BUDGET:-200}" \
            --cold "${COLD:-both}" ${FAST:+--fast "$FAST"} ${CONTROLNET:+--controlnet} \
            ${SHRINK:+--shrink --models "$kit/models-shrunk" --runs 1} \
            > "$out/bench-gpu-serve.log" 2>&1 || status=$?
        # The replicas' own logs (their tracebacks, an OOM), which an error row cuts to 400 characters.
        logs=/tmp/ray/session_latest/logs
        [ -d "$logs" ] && tar czf "$out/ray-logs.tgz" -C "$logs" serve $(cd "$logs" && ls worker-*.err 2>/dev/null) \
            2>/dev/null || true
        tail -25 "$out/bench-gpu-serve.log"
        exit "${status:-0}"
        ;;
    *)
        echo "usage: $0 check|stages|serve" >&2
        exit 2
        ;;
esac
