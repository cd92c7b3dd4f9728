#!/bin/bash
# Streaming under load with vLLM 0.26's own client (issue 17): `vllm bench serve` (random 512 in / 128 out, 300
# prompts at once, --ignore-eos; text prompts and no sampling fields, so the model's generation config applies)
# against `pagedllm serve` with each --api-server-count in COUNTS, then our client on the same server. One
# summary line per run; logs and vLLM's JSON in $RES (tar it into $OUT to bring it back).
#
# On the GPU machine, after shared/vllm-kit's chunks are installed (/tmp/vllm-env.sh exists), in one call that
# carries .vllm-carry/extra, .vllm-carry/bin, .whl (benchmarks/device_wheels.sh) and the model's config dir:
#     bash benchmarks/vllm_client_stream.sh MODEL_DIR
# vLLM's client imports xgrammar: the kit's .vllm-carry/xg (43 MB) does not fit in such a call, so .whl's xgrammar
# goes into its own directory put first on the client's PYTHONPATH (copying it into /tmp/vsite breaks flashinfer's
# older tvm_ffi). VLLM_SERVER=1 first runs vLLM's own server with the same client (start-up 80-200 s; it needs
# the kit's xg wheels too).
set -u
M=${1:?model dir}; COUNTS=${COUNTS:-1 2}; RES=${RES:-/tmp/res}; mkdir -p $RES
python3 -m pip install -q --no-index --no-deps --target /tmp/vsite-x .vllm-carry/extra/*.whl && cp -r /tmp/vsite-x/* /tmp/vsite/
python3 -m pip install -q --no-index --no-deps --target /tmp/vsite-y .whl/xgrammar*.whl .whl/apache_tvm*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
(source /tmp/vllm-env.sh; PYTHONPATH=/tmp/vsite-y:$PYTHONPATH python3 -c "import xgrammar, vllm.benchmarks.serve") ||
    { echo "vLLM's client does not import"; exit 1; }

wait_health() { # port pid log
    for _ in $(seq 1 400); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/health')" 2>/dev/null && return 0
        kill -0 $2 2>/dev/null || { tail -30 $3; return 1; }; sleep 1; done; return 1; }

vclient() { # port tag
    ( source /tmp/vllm-env.sh; export PYTHONPATH=/tmp/vsite-y:$PYTHONPATH
      python3 -m vllm.entrypoints.cli.main bench serve --backend openai --base-url http://127.0.0.1:$1 --tokenizer $M \
        --dataset-name random --random-input-len 512 --random-output-len 128 --num-prompts 300 --request-rate inf \
        --ignore-eos --disable-tqdm --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
        --save-result --result-dir $RES --result-filename $2.json > $RES/$2.log 2>&1 )
    python3 - $RES/$2.json $2 <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["completed", "failed", "duration", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p99_itl_ms"]
print(sys.argv[2], {k: round(d[k], 2) if isinstance(d.get(k), float) else d.get(k) for k in keys}, flush=True)
PY
}

oclient() { # port: our client, the same workload (token-id prompts, temperature 1)
    PYTHONPATH=$PWD:/tmp/site python3 -m pagedllm.cli bench serve --base-url http://127.0.0.1:$1 --workload random \
        --num-requests 300 --random-input-len 512 --random-output-len 128 2>&1 | tail -1; }

if [ "${VLLM_SERVER:-0}" = 1 ]; then
    ( source /tmp/vllm-env.sh; exec python3 -m vllm.entrypoints.cli.main serve $M --load-format dummy \
        --served-model-name model --port 8012 --max-model-len 4096 > $RES/vllm_serve.log 2>&1 ) &
    V=$!; wait_health 8012 $V $RES/vllm_serve.log || exit 1
    vclient 8012 vllm_warm > /dev/null; vclient 8012 vllm_server
    pkill -f "vllm.entrypoints.cli.main serve"; wait $V
fi
for n in $COUNTS; do
    t0=$(date +%s)
    PYTHONPATH=$PWD:/tmp/site python3 -m pagedllm.cli serve $M --port 8011 --served-model-name model --load-format dummy \
        --max-model-len 4096 --log-stats-interval 0 --api-server-count $n > $RES/serve$n.log 2>&1 &
    S=$!; wait_health 8011 $S $RES/serve$n.log || exit 1; echo "--api-server-count $n up in $(( $(date +%s) - t0 )) s"
    oclient 8011 > /dev/null   # warm-up
    vclient 8011 pagedllm_count$n.$t0
    echo "our client (count $n): $(oclient 8011)"
    kill $S; wait $S
done
