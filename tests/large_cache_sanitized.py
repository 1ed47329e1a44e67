"""The PyTorch half of the large-cache cases, as one plain script for compute-sanitizer.

Every prefill path and write_kv on an FP8 cache of 3.2e9 bytes (past 2^31, under 2^32) and a
bf16 cache past 2^31 elements (4.3e9 bytes), with selected pages on both sides of each mark,
each output compared with the device reference. `tests/sanitize_large_cache.sh` runs it under
memcheck. (JAX under compute-sanitizer did not finish within 10 minutes on the H100; the JAX
paths are checked at these sizes by `tests/test_parity_large_cache.py`.)
"""
import os
import sys

import numpy as np
import torch

import interop
import torch_sparse
from interop.testing import relative_error
from torch_sparse.eager import sparse_attention_eager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parity_large_cache import HEADS, TOL, _batch, _fill_torch  # noqa: E402


def main() -> int:
    failures = 0
    for cache, pages in [("fp8_e4m3", 24576), ("bfloat16", 16400)]:
        spec = interop.SparseAttentionSpec(*HEADS, topk_blocks=16, kv_cache_dtype=cache)
        view = interop.allocate_torch_kv_cache(spec, pages, "bfloat16", device="cuda")
        _fill_torch(view)
        md, topk, special = _batch(pages, view.element_size(), np.random.default_rng(0))
        tmd = interop.to_torch(md, "cuda")
        query = torch.randn((md.num_tokens, HEADS[0], 128), device="cuda").to(torch.bfloat16)
        topk = torch.as_tensor(topk, device="cuda")
        ref = torch.empty(query.shape, device="cuda")
        sparse_attention_eager(query, view, topk, tmd.block_table, tmd.token_to_req,
                               tmd.token_positions, ref, spec.scale)
        ref = ref.cpu().numpy()
        for algorithm in interop.PREFILL_ALGORITHMS:
            out = torch.full_like(query, float("nan"))
            torch_sparse.sparse_attention(spec, query, view, topk, tmd, out,
                                          prefill_algorithm=algorithm)
            err = relative_error(out.float().cpu().numpy(), ref)
            failures += err >= TOL
            print(f"{cache} {pages} pages, {algorithm}: relative error {err:.2e}", flush=True)
        slots = torch.tensor([p * 128 + o for p in special for o in (0, 127)], device="cuda")
        new = torch.randn((slots.numel(), HEADS[1], 128), device="cuda").to(torch.bfloat16)
        torch_sparse.write_kv(view, new, new, slots, spec)
        torch.cuda.synchronize()
        del view
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
