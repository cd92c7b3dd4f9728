#!/usr/bin/env bash
# decode_qkv on the GPU (carry .fa4 and .device from `bash benchmarks/gpu_targets.sh prepare`): tests, W5 off/on alternating; PART=2: W1 A/B, H200 targets
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
S=$(date +%s)
mkdir -p /tmp/site && tar xJf .fa4/site.tar.xz -C /tmp/site
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
mkdir -p .device/models && tar xJf .device/models.tar.xz -C .device/models
M=.device/models Q=.device/models/Qwen--Qwen3-0.6B
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 | cut -c1-60
step() { echo "== $1 at $(( $(date +%s) - S )) s"; }
AB="python3 benchmarks/decode_qkv_ab.py"
BT="-m pagedllm.cli bench throughput --load-format dummy --skip-tokenizer-init"
w5() { PAGEDLLM_LONG_PREFILL=cudnn timeout 110 $AB $1 benchmarks/spec_decode_gpu.py $M/Qwen--Qwen3-8B $Q --no-sweep --runs off,0.8 2>&1 | grep -E '"W5"|Error|error' | tail -3; }
if [ "${PART:-1}" = 1 ]; then
  step tests
  timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_qkv.py 2>&1 | tail -4
  for v in ${W5_RUNS:-off on off on}; do step "W5 $v"; w5 $v; done
  step engine-tests
  [ "${ENGINE_TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_engine_cuda.py tests/gpu/test_spec_decode_cuda.py 2>&1 | tail -4
else
  for v in on off; do step "W1 $v"; timeout 90 $AB $v $BT --workload W1 --model $Q | tail -1; done
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    for v in ${W4V:-on}; do
      step "W4-prefill $v"; timeout 80 $AB $v $BT --workload W4-prefill --model $Q --max-model-len 32768 | tail -1
      step "W4 $v"; timeout 100 $AB $v $BT --workload W4 --model $Q --max-model-len 32768 | tail -1
      step "W4 fp8kv $v"; timeout 100 $AB $v $BT --workload W4 --model $Q --max-model-len 32768 --kv-cache-dtype fp8 | tail -1
    done
  fi
fi
step end
