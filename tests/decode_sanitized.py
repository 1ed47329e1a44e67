"""Split-K decodes of the PyTorch path (the last split merges in the same launch) as one plain
script for compute-sanitizer: small batches (so every (token, KV head) is split), 64/4 and
16/1 heads, bf16 and FP8 with per-slot scales, speculative L=2, junk top-k entries; each
call twice (the arrival counters are reused), compared with the float32 device reference.
`tests/sanitize_decode.sh` runs it under memcheck, racecheck and synccheck."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402
import torch_sparse  # noqa: E402
from interop.testing import random_problem, relative_error  # noqa: E402
from tests.device_reference import torch_reference  # noqa: E402

TOL = 1e-2


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0
    for heads in [(64, 4), (16, 1)]:
        for cache, scale_mode in [("auto", "none"), ("fp8_e4m3", "per_slot")]:
            for batch, query_len in [(1, 1), (4, 1), (3, 2)]:
                spec = interop.SparseAttentionSpec(*heads, topk_blocks=16, kv_cache_dtype=cache)
                problem = random_problem(spec, [query_len] * batch, [4000, 129, 2000, 900][:batch],
                                         rng, decode_query_len=query_len, scatter=True,
                                         future_fraction=0.2, empty_fraction=0.05,
                                         scale_mode=scale_mode)
                md = interop.to_torch(problem.metadata, "cuda")
                cache_t = interop.kv_cache_to_torch(problem.kv_cache, spec).cuda()
                q = interop.to_torch(problem.query, "cuda")
                topk = interop.to_torch(problem.topk_indices, "cuda")
                scales = [None if s is None else (s if isinstance(s, float) else
                                                  torch.from_numpy(s).cuda())
                          for s in (problem.k_scale, problem.v_scale)]
                assert torch_sparse.attention.num_splits_for(q.shape[0], heads[1], 16) > 1
                ref = torch_reference(spec, problem.query, cache_t, problem.topk_indices,
                                      problem.metadata, problem.k_scale, problem.v_scale)
                for call in range(2):
                    out = torch.full_like(q, float("nan"))
                    torch_sparse.minimax_m3_sparse_attn_decode(
                        q, cache_t, topk, md.decode.block_table, md.decode.seq_lens, heads[1],
                        spec.scale, out, query_len, *scales)
                    err = relative_error(out.float().cpu().numpy(), ref)
                    label = f"{heads} {cache} batch {batch} L={query_len} call {call}"
                    print(f"{label}: relative error {err:.2e}", flush=True)
                    failures += not err < TOL
    print("FAILED" if failures else "all decodes match", flush=True)
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
