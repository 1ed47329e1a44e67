#!/usr/bin/env bash
# The large-cache cases of the PyTorch path (tests/large_cache_sanitized.py: every prefill
# path and write_kv, caches past 2^31 bytes and past 2^31 elements) under compute-sanitizer's
# memcheck: any out-of-bounds or misaligned device access is an error and fails the run.
# PyTorch allocates each buffer on its own here (no caching allocator), so a read outside the
# cache cannot land in a neighbouring pooled block and go unseen. Only this library's Triton
# kernels (`_..._kernel`) are instrumented: checking the cache fill and the reference too
# would take far longer than the cases themselves. About 30 s on an H100.
#   bash tests/sanitize_large_cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
exec compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    --kernel-name kns=_kernel python tests/large_cache_sanitized.py
