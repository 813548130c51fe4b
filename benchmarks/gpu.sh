#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): cold and warm latency of the 2B at 1024 px with and
# without text encoding, training MFU of layer12 and 2b at 0.25M, SDPA vs FlexAttention, peak
# memory.  One JSON document on stdout; under 8 minutes on one H100 (gpu.py keeps a 7.5-minute
# budget, this wrapper stops it at 8).  Arguments go to gpu.py (--parts, --out, --plan, ...).
# Without a CUDA device it stops at once with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 "${PYTHON:-python}" benchmarks/gpu.py "$@"
