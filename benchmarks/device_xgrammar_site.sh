#!/usr/bin/env bash
# xgrammar for the GPU machine (Python 3.12, no network; its image lacks xgrammar, so tests/gpu/test_structured_cuda.py
# failed there for want of it), as .device/xgr.tar.xz: xgrammar 0.2.9, pydantic, apache-tvm-ffi. Not in one call with
# .fa4 (the 64 MiB a call carries). There:
#   mkdir -p /tmp/xgr && tar xJf .device/xgr.tar.xz -C /tmp/xgr && export PYTHONPATH=$PWD:/tmp/xgr
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$tmp/whl" \
    xgrammar==0.2.9 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    apache-tvm-ffi==0.1.15.post2
mkdir "$tmp/site"
for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
mkdir -p .device
tar cf - -C "$tmp/site" . | xz -9 > .device/xgr.tar.xz
ls -la .device/xgr.tar.xz
