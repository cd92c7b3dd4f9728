#!/usr/bin/env bash
# Serving figures of shared/benchmarks.md on one GPU: W1 through `pagedllm serve` with all requests at once,
# at 16 requests/s, and all at once with at most 64 in flight; then the offline figure to compare with.
# One JSON line each (bench serve, then bench throughput); the server's log goes to serve.log.
#
#   bash benchmarks/serving.sh MODEL_DIR [engine flags...]     e.g. MODEL_DIR = shared/model-configs/Qwen--Qwen3-0.6B
#   NUM_REQUESTS=16 bash benchmarks/serving.sh ...             only the first 16 requests (a quick check)
#   RUNS='ARGS;ARGS' OFFLINE=0 bash benchmarks/serving.sh ...  other bench serve runs, no offline figure
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
PORT=${PORT:-8000}
PY=${PYTHON:-python3}
LOG=${SERVE_LOG:-serve.log}
ENGINE_FLAGS=(--load-format dummy --max-model-len 4096 --log-stats-interval 0 "$@")

$PY -m pagedllm.cli serve "$MODEL" --port "$PORT" --served-model-name model --log-level "${LOG_LEVEL:-warning}" "${ENGINE_FLAGS[@]}" \
    > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2> /dev/null; do
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 1
done
IFS=';' read -r -a RUN_LIST <<< "${RUNS:---request-rate inf;--request-rate 16;--request-rate inf --max-concurrency 64}"
for rate_args in "${RUN_LIST[@]}"; do
    # shellcheck disable=SC2086
    $PY -m pagedllm.cli bench serve --base-url "http://127.0.0.1:$PORT" --workload W1 $rate_args \
        ${NUM_REQUESTS:+--num-requests $NUM_REQUESTS}
done
kill $SERVER && wait $SERVER 2>/dev/null || true   # free the GPU for the offline run
[ "${OFFLINE:-1}" = 0 ] && exit 0
$PY -m pagedllm.cli bench throughput --workload W1 --model "$MODEL" "${ENGINE_FLAGS[@]}" \
    ${NUM_REQUESTS:+--num-requests $NUM_REQUESTS}
