#!/usr/bin/env bash
# Structured output through the server: W1's 256 requests at once (256 concurrent streams), plain, then each
# constrained by one of 8 JSON schemas (bench serve --json-schemas; schemas compile on first use, not before),
# then plain again. One JSON line each; the server's log goes to serve.log.
#
#   bash benchmarks/structured_serving.sh MODEL_DIR [engine flags...]   (MODEL_DIR: the Qwen3-0.6B config)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; shift
PORT=${PORT:-8000}
PY=${PYTHON:-python3}
LOG=${SERVE_LOG:-serve.log}
$PY -m pagedllm.cli serve "$MODEL" --port "$PORT" --served-model-name model --log-level warning \
    --load-format dummy --max-model-len 4096 --log-stats-interval 0 "$@" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2> /dev/null; do
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 1
done
for extra in "" "--json-schemas" ""; do
    # shellcheck disable=SC2086
    $PY -m pagedllm.cli bench serve --base-url "http://127.0.0.1:$PORT" --workload W1 --request-rate inf $extra \
        ${NUM_REQUESTS:+--num-requests $NUM_REQUESTS}
done
