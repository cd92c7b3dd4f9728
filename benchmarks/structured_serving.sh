#!/usr/bin/env bash
# Structured output through the server: W1's 256 requests at once (256 concurrent streams), plain, then each
# constrained by one of 8 JSON schemas (bench serve --json-schemas; schemas compile on first use, not before),
# then plain again. One JSON line each; the server's log goes to serve.log (benchmarks/serving.sh runs it).
#
#   bash benchmarks/structured_serving.sh MODEL_DIR [engine flags...]   (MODEL_DIR: the Qwen3-0.6B config)
RUNS="--request-rate inf;--request-rate inf --json-schemas;--request-rate inf" OFFLINE=0 \
    exec bash "$(dirname "$0")/serving.sh" "$@"
