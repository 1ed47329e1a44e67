#!/usr/bin/env bash
# The PyTorch split-K decodes (tests/decode_sanitized.py) under compute-sanitizer: memcheck
# (out-of-bounds or misaligned accesses), racecheck (shared-memory hazards) and synccheck
# (barrier misuse) on this library's Triton kernels only. Any error fails the run.
#   bash tests/sanitize_decode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck synccheck; do
    echo "== $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
        --kernel-name kns=_kernel python tests/decode_sanitized.py
done
