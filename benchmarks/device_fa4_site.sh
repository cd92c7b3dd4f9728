#!/usr/bin/env bash
# FlashAttention-4 for the GPU machine (Python 3.12, no network there), as .fa4/site.tar.xz (git-ignored; carry
# ".fa4"): flash-attn-4 4.0.0b40 and CuTe DSL 4.8.1 (CUDA 13 libraries) with what they import
# that the machine's image lacks. The DSL's libraries are 264 MB; pruned of its profiler, stubs and JAX glue and
# packed by xz with a 256 MiB dictionary they are ~60 MB with the frontend, which leaves room in a call's 64 MiB for the checkout.
# Also nvidia-cudnn-frontend (cuDNN's prefill path, pagedllm's `cudnn` extra): the machine's image lacked it on
# 2026-12-06. There:
#   mkdir -p /tmp/site && tar xJf .fa4/site.tar.xz -C /tmp/site
#   export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
# (the DSL's `cutlass` package sits under dsl_packages, put on sys.path by a .pth file that PYTHONPATH skips).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
platforms=""
for n in 17 24 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 -d "$tmp/whl" \
    flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 nvidia-cudnn-frontend==1.22.1
mkdir "$tmp/site"
for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
dsl="$tmp/site/nvidia_cutlass_dsl"
# cutlass/jax stays: cutlass/__init__.py imports it (it imports JAX itself only when used)
rm -rf "$dsl/dsl_packages/iket" "$dsl/cu13/lib/stubs" "$dsl"/cu13/lib/*.a
mkdir -p .fa4
tar cf - -C "$tmp/site" . | xz -T1 --lzma2=preset=9e,dict=256MiB > .fa4/site.tar.xz
ls -la .fa4/site.tar.xz
