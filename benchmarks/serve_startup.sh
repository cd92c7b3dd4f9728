#!/bin/bash
# pagedllm serve's start-up: seconds from the command to a 200 on /health, each start a fresh server, for the code in
# each CODE_DIR (a checkout's root, or a directory holding an older `pagedllm` package: `git archive REV pagedllm |
# tar -x -C DIR`), in turn, ROUNDS times. The first start on a machine also builds the Triton kernels: WARM=1 (the
# default) makes one start first and leaves it out. Each line: the code, --api-server-count, seconds, and the log's
# start-up lines with seconds since the command (benchmarks/trace's sitecustomize stamps them: PAGEDLLM_LOG_T0).
#
#     bash benchmarks/serve_startup.sh MODEL_DIR CODE_DIR [CODE_DIR ...]     (COUNT=1 ROUNDS=2 PORT=8011 EXTRA=...)
set -u
M=$(realpath "${1:?model dir}"); shift
COUNT=${COUNT:-1}; ROUNDS=${ROUNDS:-2}; PORT=${PORT:-8011}; EXTRA=${EXTRA:-}; STAMP=$(realpath "$(dirname "$0")")/trace
start() { # code_dir tag
    local log=/tmp/serve_startup_$2.log code; code=$(realpath "$1")
    PAGEDLLM_LOG_T0=$(date +%s.%N); export PAGEDLLM_LOG_T0
    ( cd /tmp && exec env PYTHONPATH="$code:${SITE:-}:$STAMP" python3 -m pagedllm.cli serve "$M" --port $PORT \
        --load-format dummy --max-model-len 4096 --log-stats-interval 0 --api-server-count $COUNT $EXTRA > $log 2>&1 ) &
    local pid=$! up=""
    for _ in $(seq 1 3000); do
        if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null; then
            up=$(python3 -c "import os, time; print(round(time.time() - float(os.environ['PAGEDLLM_LOG_T0']), 2))")
            break; fi
        kill -0 $pid 2>/dev/null || break; sleep 0.1
    done
    echo "$2: code $1, --api-server-count $COUNT: /health after ${up:-NEVER (see $log)} s"
    grep -E "ready in|captured|serving" $log | cut -c1-200 | sed 's/^/    /'
    kill $pid 2>/dev/null; wait $pid 2>/dev/null; sleep 1
}
[ "${WARM:-1}" = 1 ] && start "$1" warm > /dev/null
for r in $(seq 1 $ROUNDS); do for code in "$@"; do start "$code" "$(basename "$(realpath "$code")").$r"; done; done
