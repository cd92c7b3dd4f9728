#!/bin/bash
# Streaming under load (issue 17): 300 streams at once (random 512 in / 128 out, bench serve), twice; CPU seconds
# of the API process and of its children (the engine core) over the second run (the window also holds the
# client's start-up: compare with the run's duration_s). Server log in $OUT/serve.log.
#   bash benchmarks/stream_cpu.sh MODEL_DIR     (N=, IN=, OUTLEN=, MAXLEN= to change the run; SERVE_ARGS= more serve
#   flags, e.g. SERVE_ARGS='--api-server-count 2': each API process and the core are then listed)
M=${1:?model dir}; N=${N:-300}; OUT=${OUT:-.}
python3 -m pagedllm.cli serve $M --port 8011 --served-model-name model --load-format dummy --max-model-len ${MAXLEN:-4096} \
    --log-stats-interval 0 --log-level warning ${SERVE_ARGS:-} > $OUT/serve.log 2>&1 &
S=$!
until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8011/health')" 2>/dev/null; do
    kill -0 $S 2>/dev/null || { tail -20 $OUT/serve.log; exit 1; }; sleep 1; done
B="python3 -m pagedllm.cli bench serve --base-url http://127.0.0.1:8011 --workload random --num-requests $N --random-input-len ${IN:-512} --random-output-len ${OUTLEN:-128}"
$B > /dev/null 2>&1
ticks() { for p in $S $(pgrep -P $S); do echo "$p $(awk '{print $14+$15}' /proc/$p/stat) $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-60)"; done; }
ticks > /tmp/t0; t0=$(date +%s.%N)
$B 2>&1 | tail -3
t1=$(date +%s.%N); ticks > /tmp/t1
python3 - "$t0" "$t1" <<'PY'
import sys
wall = float(sys.argv[2]) - float(sys.argv[1])
a = {l.split()[0]: (int(l.split()[1]), l.split(None, 2)[2].strip()) for l in open('/tmp/t0')}
for l in open('/tmp/t1'):
    pid, t, *cmd = l.split(None, 2)
    if pid in a:
        print(f"pid {pid} cpu {(int(t) - a[pid][0]) / 100:.2f} s over {wall:.2f} s wall ({(int(t) - a[pid][0]) / 100 / wall:.0%}): {a[pid][1][:60]}")
PY
kill $S; wait $S 2>/dev/null
