"""Measurements behind the tuning notes: what limits each path.

    python benchmarks/explore.py [sweep] [fp8] [prefill]   # default: all three
    python benchmarks/explore.py ncu      # one prefill launch of each path (run under ncu)

- sweep: JAX decode time per call (calls unrolled inside one jitted function, as in a JAX model
  step) for num_splits x num_warps, against PyTorch's CUDA-graph replay. On the H100 this loop
  measured 30-50 us per call above the back-to-back figure (the barriers and live outputs it
  needs cost something): compare its variants with each other, not with other timings.
- fp8: FP8 e4m3 against bf16 decode on both paths.
- prefill: 16k-token prefill on both paths, bf16 and FP8.
"""
from __future__ import annotations

import statistics
import sys
import time

from harness import Case, graph_warm_ms, jax_call_ms, torch_cold_ms  # first: the environment

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402


def jax_loop_ms(f, q, *rest, n=10, reps=5):
    """Device time per call of f(q, *rest): n calls unrolled inside one jitted function (as in
    a JAX model step; no while-loop overhead), each call's q tied to the previous output by an
    optimization barrier so none is hoisted or merged."""
    import jax
    from jax import lax

    @jax.jit
    def loop(q, *rest):
        out, outs = q, []
        for _ in range(n):
            qq, out = lax.optimization_barrier((q, out))
            outs.append(out)  # every output stays live: no call is dead code
            out = f(qq, *rest).astype(q.dtype)
        return out, outs

    jax.block_until_ready(loop(q, *rest))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, *rest))
        ts.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(ts)


def jax_decode_sweep(rng):
    """JAX decode: device time per call for splits x warps, against PyTorch's graph replay."""
    cases = [("auto", 64, 4, 1, (8, 16)), ("auto", 64, 4, 16, (1, 2, 4)),
             ("auto", 64, 4, 64, (1, 2)), ("auto", 16, 1, 64, (1, 2, 4)),
             ("fp8_e4m3", 64, 4, 16, (1, 2, 4)), ("fp8_e4m3", 64, 4, 64, (1, 2))]
    for cd, nh, nkv, b, splits_list in cases:
        spec = interop.SparseAttentionSpec(nh, nkv, kv_cache_dtype=cd)
        case = Case(spec, [1] * b, [32768] * b, rng)
        graph = graph_warm_ms(case.torch_fn())
        res = []
        for splits in (None, *splits_list):
            for w in ((None,) if splits is None else (4, 8)):
                f = case.jax_op(num_splits=splits, num_warps=w)
                t = jax_loop_ms(f, case.j_q, case.j_cache, case.j_topk, case.j_md)
                res.append(f"s{splits or 'default'}w{w or ''} {t*1e3:.1f}")
        print(f"decode {nh}/{nkv} {cd} b{b}: torch graph {graph*1e3:.1f} us "
              f"({case.kv_bytes/(graph*1e-3)/1e12:.2f} TB/s) | jax in-jit us: "
              + ", ".join(res), flush=True)
        del case
        torch.cuda.empty_cache()


def fp8_rows(rng):
    """FP8 against bf16 decode (64/4), both paths: torch graph replay, JAX in-jit."""
    for b in (64, 256):
        times = {}
        for cd in ("auto", "fp8_e4m3"):
            spec = interop.SparseAttentionSpec(64, 4, kv_cache_dtype=cd)
            case = Case(spec, [1] * b, [32768] * b, rng)
            tt = graph_warm_ms(case.torch_fn())
            tj = jax_loop_ms(case.jax_op(), case.j_q, case.j_cache, case.j_topk, case.j_md)
            times[cd] = (tt, tj)
            print(f"decode 64/4 {cd} b{b}: torch graph {tt*1e3:.0f} us, jax in-jit "
                  f"{tj*1e3:.0f} us, err {case.check():.1e}", flush=True)
            del case
            torch.cuda.empty_cache()
        print(f"fp8 speedup b{b}: torch {times['auto'][0]/times['fp8_e4m3'][0]:.2f}x, "
              f"jax {times['auto'][1]/times['fp8_e4m3'][1]:.2f}x", flush=True)


def prefill_rows(rng):
    for nh, nkv in ((64, 4), (16, 1)):
        for cd in ("auto", "fp8_e4m3"):
            spec = interop.SparseAttentionSpec(nh, nkv, kv_cache_dtype=cd)
            case = Case(spec, [16384], [16384], rng, decode_query_len=16385)
            err = case.check()
            tt = torch_cold_ms(case.torch_fn())
            tj = jax_call_ms(case.jax_fn(), iters=10)
            print(f"prefill {nh}/{nkv} {cd} 16k: torch {tt:.2f} ms "
                  f"({case.flops/(tt*1e-3)/1e12:.0f} TFLOP/s), jax {tj:.2f} ms "
                  f"({case.flops/(tj*1e-3)/1e12:.0f}), err {err:.1e}", flush=True)
            del case
            torch.cuda.empty_cache()


def ncu_prefill(rng):
    """One launch of each path's prefill kernel (64/4, 16k tokens) for ncu to profile."""
    spec = interop.SparseAttentionSpec(64, 4)
    case = Case(spec, [16384], [16384], rng, decode_query_len=16385)
    case.check()  # one call of each path
    torch.cuda.synchronize()


def main():
    rng = np.random.default_rng(0)
    if sys.argv[1:] == ["ncu"]:
        ncu_prefill(rng)
        return
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    parts = {"sweep": jax_decode_sweep, "fp8": fp8_rows, "prefill": prefill_rows}
    for name in (sys.argv[1:] or parts):
        part = parts[name]
        try:
            part(rng)
        except Exception as e:  # noqa: BLE001 - one failed experiment must not hide the rest
            print(f"{part.__name__}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
