#!/usr/bin/env bash
# The GPU numbers of docs/performance.md in one command; see bench/gpu_check.py for what it runs and needs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
exec python bench/gpu_check.py "$@"
