#!/usr/bin/env bash
# The large-cache GPU cases (tests/test_large_cache.py) under compute-sanitizer's memcheck:
# every out-of-bounds or misaligned device access is an error, and the run fails on the first.
# Both frameworks allocate each buffer on its own here (no pooling), so a read outside the
# cache cannot land in a neighbouring pooled allocation and go unseen.
#   bash tests/sanitize_large_cache.sh [extra pytest arguments, e.g. -k fp8_e4m3]
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
# XLA's command buffers (CUDA graphs) hide kernels from the sanitizer's launch hooks.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
# Only this library's kernels are instrumented (Triton: `_..._kernel`; Pallas: sparse_attention_*,
# k2q_block_*): checking every framework kernel too (the cache fills, the references) takes
# far longer than the cases themselves.
exec compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    --kernel-name kns=_kernel --kernel-name kns=sparse_attention --kernel-name kns=k2q_block \
    python -m pytest -q -x -m large -p no:cacheprovider tests/test_large_cache.py "$@"
