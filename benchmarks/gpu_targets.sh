#!/usr/bin/env bash
# The open issues' GPU figures in one device call (dummy weights, model configs only):
#   here:  bash benchmarks/gpu_targets.sh prepare   (configs into .device/models.tar.xz; FA4 into .fa4/ if missing)
#   there: bash benchmarks/gpu_targets.sh            (carry [".fa4", ".device"]; ~8 minutes on an H200)
# W5 (issue 16), W4 / W4-prefill with FA4 (the default where it imports) and W4 with cuDNN (issue 17), the 8B
# verify's GEMV bandwidth (gemv_bandwidth.py) and the speculative step's profile, then W2 bf16 / fp8 (issue 18). On an H100 the H200
# targets do not apply: it runs the GPU tests of the newest CUDA paths, of the sampler and speculation, W5 and W2's
# fp8 ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    rm -rf .device/models && mkdir -p .device/models
    for m in Qwen--Qwen3-8B Qwen--Qwen3-0.6B meta-llama--Llama-3.1-8B-Instruct; do
        mkdir -p .device/models/$m && cp ../shared/model-configs/$m/{config.json,generation_config.json} .device/models/$m/
    done
    tar cJf .device/models.tar.xz -C .device/models . && rm -rf .device/models
    [ -f .fa4/site.tar.xz ] || bash benchmarks/device_fa4_site.sh   # delete it to rebuild (a new version)
    exit
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
S=$(date +%s)
mkdir -p /tmp/site && tar xJf .fa4/site.tar.xz -C /tmp/site
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages   # cutlass: see device_fa4_site.sh
mkdir -p .device/models && tar xJf .device/models.tar.xz -C .device/models
M=.device/models Q=.device/models/Qwen--Qwen3-0.6B L=.device/models/meta-llama--Llama-3.1-8B-Instruct
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 | cut -c1-60
# Say which long-prefill kernels import: a silent fallback to the Triton kernel costs W4-prefill ~45%
python3 -c "from flash_attn.cute import interface; print('FA4 imports')" 2>&1 | tail -1
python3 -c "import cudnn; print('cuDNN frontend', cudnn.__version__)" 2>&1 | tail -1
step() { echo "== $1 at $(( $(date +%s) - S )) s"; }
BT="python3 -m pagedllm.cli bench throughput --load-format dummy --skip-tokenizer-init"
w5() { PAGEDLLM_LONG_PREFILL=cudnn timeout 150 python3 benchmarks/spec_decode_gpu.py $M/Qwen--Qwen3-8B $Q --no-sweep; }
w2() { PAGEDLLM_LONG_PREFILL=cudnn timeout 100 $BT --workload W2 --model $L --max-model-len 4096 "$@" | tail -1; }
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    step W5; w5
    step W4-auto; timeout 110 $BT --workload W4 --model $Q --max-model-len 32768 | tail -1
    step W4-prefill-auto; timeout 90 $BT --workload W4-prefill --model $Q --max-model-len 32768 | tail -1
    step gemv; timeout 150 python3 benchmarks/gemv_bandwidth.py --quick | grep -v "^  "
    step W4-cudnn; PAGEDLLM_LONG_PREFILL=cudnn timeout 100 $BT --workload W4 --model $Q --max-model-len 32768 | tail -1
    step spec-profile; PAGEDLLM_LONG_PREFILL=cudnn timeout 80 python3 benchmarks/spec_step_profile.py $M/Qwen--Qwen3-8B $Q | tail -60
else
    step gpu-tests   # sessions 60-61's CUDA paths not yet run on a GPU first: Gemma's norm / GeGLU kernels, freed windows
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/e2e/test_window_kv.py \
        tests/kernels/test_fused_layers.py tests/gpu/test_models_cuda.py | tail -4
    timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fp8_gemm.py \
        -k "fused_silu_and_mul_quant or fused_model_equals" | tail -4
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_spec_decode_cuda.py \
        tests/kernels/test_gumbel_sampling.py tests/gpu/test_engine_cuda.py | tail -4
    step W5; w5
fi
step W2-bf16; w2
step W2-fp8; w2 --quantization fp8
step end
