#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (Python 3.12; no network there), into .whl/ (git-ignored): the server's
# FastAPI stack and xgrammar with what they import. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
# (xgrammar 0.2.x imports tvm_ffi; fastapi 0.165 imports opentelemetry.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 uvicorn==0.55.0 httptools==0.9.0 typing-inspection==0.4.5 annotated-types==0.8.0 \
    opentelemetry-api==1.45.2
ls .whl
