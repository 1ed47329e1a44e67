"""The main job: one paged cache, written by one framework, attended by both.

    python -m examples.demo                 # CPU: small shapes, interpreted kernels
    python -m examples.demo --device gpu    # GPU: MiniMax-M3 head counts, top-k 16

Builds a decode-first batch (decodes + prefills with and without cached context), writes the
new tokens' K/V with `torch_sparse.write_kv` or `jax_sparse.write_kv`, hands the cache to the
other framework through DLPack (checking that the buffer address is the same), attends it with
the Triton kernels and the Pallas kernels, and reports the errors against the float64 reference
and between the frameworks, and timings. `examples/` and the parity tests are the only places
that bring both front ends together; `interop` imports neither.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from interop import CACHE_DTYPES, KV_CACHE_STRIDE_ORDERS, SparseAttentionSpec
from interop.testing import random_problem

from .cross_framework import run_cross_framework


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _parse_prefills(text: str):
    """"4096:0,512:2048" -> query lens [4096, 512], context lens [0, 2048]."""
    q, c = [], []
    for item in filter(None, text.split(",")):
        length, _, ctx = item.partition(":")
        q.append(int(length))
        c.append(int(ctx or 0))
    return q, c


def main(argv=None) -> int:
    gpu = _cuda_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--writer", choices=["torch", "jax"], default="torch",
                    help="framework that writes the new tokens' K/V into the cache")
    ap.add_argument("--layout", choices=list(KV_CACHE_STRIDE_ORDERS), default="NHD")
    ap.add_argument("--cache-dtype", choices=list(CACHE_DTYPES), default="auto")
    ap.add_argument("--scale", choices=["none", "scalar", "per_slot"], default="none",
                    help="FP8 k/v scale mode")
    ap.add_argument("--heads", default=None, help="query/kv heads, e.g. 64/4")
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--decodes", type=int, default=None, help="decode requests")
    ap.add_argument("--decode-query-len", type=int, default=1)
    ap.add_argument("--context", type=int, default=None, help="tokens of each decode request")
    ap.add_argument("--prefills", default=None,
                    help="prefill requests as query_len:context_len, comma separated")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = ("gpu" if gpu else "cpu") if args.device == "auto" else args.device
    if device == "gpu" and not gpu:
        ap.error("--device gpu needs CUDA, which PyTorch does not see here")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # PyTorch and JAX share the GPU: keep JAX from reserving most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    big = device == "gpu"
    heads = args.heads or ("64/4" if big else "16/2")
    num_heads, num_kv_heads = (int(x) for x in heads.split("/"))
    decodes = args.decodes if args.decodes is not None else (16 if big else 2)
    context = args.context or (32768 if big else 700)
    pq, pc = _parse_prefills(args.prefills or ("512:0,256:8192" if big else "48:0,16:300"))
    spec = SparseAttentionSpec(num_heads, num_kv_heads, topk_blocks=args.topk or (16 if big else 4),
                               kv_cache_dtype=args.cache_dtype, kv_cache_layout=args.layout)
    L = args.decode_query_len
    query_lens = [L] * decodes + pq
    seq_lens = [context] * decodes + [q + c for q, c in zip(pq, pc)]
    problem = random_problem(spec, query_lens, seq_lens, np.random.default_rng(args.seed),
                             decode_query_len=L, scale_mode=args.scale)
    md = problem.metadata
    print(f"MiniMax-M3 sparse attention demo on {device}: heads {num_heads}/{num_kv_heads}, "
          f"head {spec.head_size}, block {spec.block_size}, top-k {spec.topk_blocks}, "
          f"cache {args.cache_dtype} {args.layout}, scale {args.scale}")
    print(f"batch: {md.num_decodes} decodes x {L} token(s) at {context} tokens, "
          f"{md.num_prefills} prefills (query:context {','.join(f'{q}:{c}' for q, c in zip(pq, pc))}), "
          f"{md.num_actual_tokens} tokens, {problem.kv_cache.shape[0]} pages")
    res = run_cross_framework(problem, writer=args.writer, device=device,
                              time_iters=args.iters if args.iters is not None else (20 if big else 2))
    other = "jax" if args.writer == "torch" else "torch"
    print(f"cache written by {args.writer}, attended by both; crossed to {other} without a copy: "
          f"{'yes (same buffer address)' if res.zero_copy else 'NO'}")
    for name, err in res.errors.items():
        print(f"  relative error {name:<20s} {err:.2e}")
    if res.torch_ms is not None:
        print(f"  time per call: torch_sparse (Triton{'' if big else ', interpreted'}) "
              f"{res.torch_ms:.3f} ms, jax_sparse (Pallas{'' if big else ', interpreted'}, jitted) "
              f"{res.jax_ms:.3f} ms")
    ok = res.zero_copy and max(res.errors.values()) < 2e-2
    print("parity: OK" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
