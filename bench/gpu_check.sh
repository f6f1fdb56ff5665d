#!/usr/bin/env bash
# The GPU check kit's one command (docs/gpu.md): build, test, sanitize and bench lowbit's CUDA kernels
# on the card this machine has, or with --dry-run on the simulator. Exit code = the check's result.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
