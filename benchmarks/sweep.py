"""Variant timings for tuning (num_warps, num_stages, num_splits) of both paths on one device.

    python benchmarks/sweep.py > sweep.log

Uses harness.Case (same data for both paths); prints one line per variant.
"""
from __future__ import annotations

from harness import (Case, graph_warm_ms, jax_call_ms, jax_steady_ms,  # first: the environment
                     torch_cold_ms)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402

VARIANTS = [(4, 2), (4, 3), (8, 2), (8, 3)]


def sweep(case, label, splits_list=(None,)):
    from torch_sparse.attention import launch_sparse_attention
    spec, md = case.spec, case.t_md
    unit = case.kv_bytes / 1e12 if case.md.num_decodes else case.flops / 1e15
    what = "TB/s" if case.md.num_decodes else "TFLOP/s"
    for splits in splits_list:
        for w, s in VARIANTS:
            def t_fn():
                launch_sparse_attention(case.q, case.cache, case.topk, md.block_table, case.out,
                                        spec.scale, token_to_req=md.token_to_req,
                                        token_positions=md.token_positions, num_splits=splits,
                                        num_warps=w, num_stages=s)
            try:
                tt = graph_warm_ms(t_fn)
            except Exception as e:  # a variant that does not compile (shared memory) is skipped
                tt = float("nan")
                print(f"  torch w{w} s{s}: {type(e).__name__}: {str(e)[:120]}")
            j_fn = case.jax_fn(num_warps=w, num_stages=s, num_splits=splits)
            try:
                jt = jax_call_ms(j_fn, iters=20)
                jp = jax_steady_ms(j_fn)
            except Exception as e:
                jt = jp = float("nan")
                print(f"  jax w{w} s{s}: {type(e).__name__}: {str(e)[:120]}")
            print(f"{label} splits={splits} w{w} s{s}: torch graph {tt*1e3:.0f} us "
                  f"({unit/(tt*1e-3):.2f} {what}) | jax call {jt*1e3:.0f} us, pipelined "
                  f"{jp*1e3:.0f} us ({unit/(jp*1e-3):.2f} {what})", flush=True)


def eager_overhead(case):
    """Host cost of the front end: the public eager call against the bare launcher."""
    from torch_sparse.attention import launch_sparse_attention
    spec, md = case.spec, case.t_md
    pub = torch_cold_ms(case.torch_fn())
    bare = torch_cold_ms(lambda: launch_sparse_attention(
        case.q, case.cache, case.topk, md.block_table, case.out, spec.scale,
        token_to_req=md.token_to_req, token_positions=md.token_positions))
    print(f"eager b{case.md.num_decodes}: sparse_attention {pub*1e3:.0f} us, bare launcher "
          f"{bare*1e3:.0f} us", flush=True)


def main():
    rng = np.random.default_rng(0)
    spec = interop.SparseAttentionSpec(64, 4)
    eager_overhead(Case(spec, [1], [32768], rng))
    for cd, b in (("auto", 64), ("auto", 256), ("fp8_e4m3", 256)):
        spec = interop.SparseAttentionSpec(64, 4, kv_cache_dtype=cd)
        case = Case(spec, [1] * b, [32768] * b, rng)
        sweep(case, f"decode 64/4 {cd} b{b}")
        del case
        torch.cuda.empty_cache()
    spec = interop.SparseAttentionSpec(64, 4)
    case = Case(spec, [1] * 16, [32768] * 16, rng)
    sweep(case, "decode 64/4 auto b16", splits_list=(2, 4, 8))
    del case
    case = Case(spec, [16384], [16384], rng, decode_query_len=16385)
    sweep(case, "prefill 64/4 auto 16k")


if __name__ == "__main__":
    main()
