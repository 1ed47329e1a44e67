"""The Mosaic GPU union prefill kernel beside the Triton-backend union and JAX's own
FlashAttention-3 (Mosaic GPU, dense) as the ceiling. GPU only (Hopper).

    python benchmarks/mosaic_union_bench.py                       # 64/4 bf16, 16k and 64k
    python benchmarks/mosaic_union_bench.py --shapes 16k --paths mosaic:kernel,jax:union
    python benchmarks/mosaic_union_bench.py --rows 16k:random:mosaic:auto+mosaic:token
    python benchmarks/mosaic_union_bench.py --list                # the paths
    python benchmarks/mosaic_union_bench.py --cache fp8_e4m3 --paths mosaic:kernel,jax:auto

One prefill request of 16k / 64k tokens (no cached context), 64/4 heads (--heads), a bf16
cache (--cache: or FP8 with scalar scales, as bench.py's FP8 rows), bf16 queries, selections
`make_topk(rho=0.87)` (the M3 indexer's overlap). Useful TFLOP/s = 4 * 128 * the keys each
(token, query head) attends / time (`harness.Case.flops`), cold L2 (`harness.jax_cold_ms` /
`torch_cold_ms`). Every path's output is first checked on sampled rows against the float64
reference. Paths:
- `mosaic:kernel` (`_s3`, `_nopp`, `_persist`, `_fence`, `_persist_fence`):
  `mosaic_union.paged_sparse_attention_mosaic_union` on every token (plan + kernel; 2-stage
  ring with ping-pong; 3 stages; no ping-pong; the two variant knobs: `programs` = the SM
  count (a persistent grid), `softmax_fence`, and both);
- `mosaic:plan`: its XLA plan alone (`plan_chunk`), to split the figure above;
- `mosaic:union`, `mosaic:auto`, `mosaic:token`: the public call, implementation="mosaic";
- `jax:union`, `torch:union`: the Triton-backend union (Pallas on Triton; PyTorch Triton);
- `fa3:dense`: `jax.experimental.pallas.ops.gpu.attention_mgpu` on the same tokens, dense
  (non-causal and causal), 64 query / 4 KV heads: its FLOPs are 4 * 128 * keys attended too.
Writes --out (JSON) after every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import harness  # first: sets the environment before any kernel import
from harness import Case, jax_cold_ms, sample, torch_cold_ms  # noqa: E402

import numpy as np  # noqa: E402

import interop  # noqa: E402
from interop.testing import mean_tile_union, relative_error  # noqa: E402

SHAPES = {"16k": ([16384], [16384]), "64k": ([65536], [65536]), "4k": ([4096], [4096])}
PATHS = ("mosaic:kernel", "mosaic:kernel_s3", "mosaic:kernel_nopp", "mosaic:kernel_persist",
         "mosaic:kernel_fence", "mosaic:kernel_persist_fence",
         "mosaic:plan", "mosaic:union", "mosaic:auto", "mosaic:token", "jax:union", "jax:auto",
         "torch:union", "torch:auto", "fa3:dense", "fa3:causal")
CACHES = {"bf16": "auto", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
FP8_SCALES = (0.75, 1.25)  # scalar k_scale, v_scale (bench.py's FP8 rows)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def kernel_call(case, **kw):
    import jax

    from jax_sparse.mosaic_union import paged_sparse_attention_mosaic_union
    md, n = case.j_md, case.md.num_tokens

    @jax.jit
    def run(q, cache, topk, t2r, pos, table, k_scale, v_scale):
        return paged_sparse_attention_mosaic_union(case.spec, q, cache, topk, t2r, pos, table,
                                                   k_scale, v_scale, **kw)[0]
    args = (case.j_q, case.j_cache, case.j_topk, md.token_to_req[:n], md.token_positions[:n],
            md.block_table, case.j_k_scale, case.j_v_scale)
    return lambda: run(*args)


def plan_call(case):
    import jax

    from jax_sparse.mosaic_union import plan_chunk
    md, n, spec = case.j_md, case.md.num_tokens, case.spec

    @jax.jit
    def run(topk, t2r, pos, table):
        import jax.numpy as jnp
        plan = plan_chunk(topk[:, :n], t2r, pos, table, jnp.ones((n,), bool),
                          num_blocks=case.j_cache.shape[0], block_size=spec.block_size,
                          num_queries_per_kv=spec.num_queries_per_kv, max_union=None)
        return plan.keys  # the last table built (the others feed it or are cheap)
    args = (case.j_topk, md.token_to_req[:n], md.token_positions[:n], md.block_table)
    return lambda: run(*args)


def fa3_call(case, causal):
    """(call, flops): JAX's FA3 on the case's queries as one dense sequence."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3
    spec, n = case.spec, case.md.num_tokens
    # jax 0.11.2's attention_mgpu stages queries and outputs in float16 shared memory
    # whatever the input dtype (bfloat16 fails to lower): float16, the same tensor-core rate.
    q = case.j_q[None].astype(jnp.float16)  # [1, n, H, D]
    key = jax.random.key(0)
    k = jax.random.normal(key, (1, n, spec.num_kv_heads, spec.head_size), q.dtype)
    v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, q.dtype)
    config = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
    keys = n * (n + 1) // 2 if causal else n * n
    flops = 4 * spec.head_size * keys * spec.num_heads
    return (lambda: fa3.attention(q, k, v, config)), flops


def path_call(case, path):
    """(call, flops or None (the case's)) for one path."""
    if path == "mosaic:kernel":
        return kernel_call(case), None
    if path == "mosaic:kernel_s3":
        return kernel_call(case, num_stages=3), None
    if path == "mosaic:kernel_nopp":
        return kernel_call(case, pingpong=False), None
    if path.startswith("mosaic:kernel_") and path.removeprefix("mosaic:kernel_") in (
            "persist", "fence", "persist_fence"):
        import jax
        knobs = path.removeprefix("mosaic:kernel_").split("_")
        return kernel_call(case, softmax_fence="fence" in knobs,
                           programs=jax.devices()[0].core_count if "persist" in knobs
                           else None), None
    if path == "mosaic:plan":
        return plan_call(case), None
    if path.startswith("fa3:"):
        return fa3_call(case, causal=path == "fa3:causal")
    fw, alg = path.split(":")
    if fw == "torch":
        return case.torch_fn(alg), None
    impl = "mosaic" if fw == "mosaic" else "pallas"
    return case.jax_fn(implementation=impl, prefill_algorithm=alg), None


def run_shape(args, shape, rho, paths, rng, result, save):
    heads, kv_heads = map(int, args.heads.split("/"))
    spec = interop.SparseAttentionSpec(heads, kv_heads, topk_blocks=16,
                                       kv_cache_dtype=CACHES[args.cache])
    ql, sl = SHAPES[shape]
    t0 = time.perf_counter()
    case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1, rho=rho,
                scales=FP8_SCALES if spec.is_fp8 else None)
    idx = case.sample_idx(args.samples)
    ref = case.reference(idx)
    selection = "random" if rho is None else f"rho{rho}"
    row = dict(shape=shape, selection=selection, heads=args.heads, cache=args.cache,
               tokens=case.md.num_tokens, flops=case.flops,
               union8=mean_tile_union(case.topk_np, case.md), paths={},
               setup_s=time.perf_counter() - t0)
    result["rows"].append(row)
    log(f"{shape} {selection} {args.heads} {args.cache}: {case.md.num_tokens} tokens, {case.flops / 1e12:.2f} useful TFLOP, "
        f"mean 8-token union {row['union8']:.1f}")
    for path in paths:
        p = row["paths"][path] = {}
        if path.startswith("fa3:") and case.md.num_tokens > args.fa3_max_tokens:
            p["note"] = f"dense FA3 timed up to {args.fa3_max_tokens} tokens (a rate)"
            continue
        try:
            call, flops = path_call(case, path)
            t0 = time.perf_counter()
            out = call()
            if path not in ("mosaic:plan",) and not path.startswith("fa3:"):
                got = sample(out, idx)
                p["err_vs_f64"] = relative_error(got, ref)
            p["first_call_s"] = time.perf_counter() - t0
            timer = torch_cold_ms if path.startswith("torch") else jax_cold_ms
            p["ms"] = timer(call, rep_ms=args.rep_ms)
            p["tflops"] = (flops or case.flops) / (p["ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            p["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        save()
        log(f"  {path}: " + (f"{p['ms']:.3f} ms, {p['tflops']:.0f} TFLOP/s"
                             + (f", err {p['err_vs_f64']:.1e}" if "err_vs_f64" in p else "")
                             + f" (first call {p['first_call_s']:.1f} s)"
                             if "ms" in p else p["error"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="16k,64k", help=", ".join(SHAPES))
    ap.add_argument("--paths", default=",".join(PATHS), help=", ".join(PATHS))
    ap.add_argument("--rows", default=None,
                    help="SHAPE:SELECTION[:PATH+PATH...] rows separated by commas, SELECTION "
                    "rho0.87 or random (default: --shapes x rho0.87 x --paths)")
    ap.add_argument("--heads", default="64/4", help="query heads / KV heads")
    ap.add_argument("--cache", default="bf16", choices=sorted(CACHES))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--fa3-max-tokens", type=int, default=16384)
    ap.add_argument("--out", default="mosaic_union_bench.json")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    if args.list:
        print("\n".join(PATHS))
        return 0
    import jax
    import torch
    result = dict(device=torch.cuda.get_device_name(), jax=jax.__version__,
                  torch=torch.__version__, ceilings=harness.ceilings(), rows=[])
    log(f"{result['device']}, jax {jax.__version__}, ceilings {result['ceilings']}")

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    rng = np.random.default_rng(0)
    rows = ([r.split(":", 2) for r in args.rows.split(",")] if args.rows else
            [[shape, "rho0.87"] for shape in args.shapes.split(",")])
    for shape, selection, *paths in rows:
        rho = None if selection == "random" else float(selection.removeprefix("rho"))
        paths = paths[0].split("+") if paths else args.paths
        try:
            run_shape(args, shape, rho, paths, rng, result, save)
        except Exception as e:  # noqa: BLE001
            result["rows"].append(dict(shape=shape, selection=selection,
                                       error=f"{type(e).__name__}: {e}"[:600]))
            log(f"{shape} {selection}: FAILED {result['rows'][-1]['error']}")
        save()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
