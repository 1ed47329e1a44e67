"""The main job: one paged cache, written by one framework, attended by both.

    python -m interop.demo                 # CPU: small shapes, interpreted kernels
    python -m interop.demo --device gpu    # GPU: MiniMax-M3 head counts, top-k 16

Builds a decode-first batch (decodes + prefills with and without cached context), writes the
new tokens' K/V with `torch_sparse.write_kv` or `jax_sparse.write_kv`, hands the cache to the
other framework through DLPack (checking that the buffer address is the same), attends it with
the Triton kernels and the Pallas kernels, and reports the errors against the float64 reference
and between the frameworks, and timings. This module and the parity tests are the only places
that bring both front ends together; `interop`'s core imports neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

from .reference import reference_attention
from .spec import CACHE_DTYPES, KV_CACHE_STRIDE_ORDERS, SparseAttentionSpec
from .testing import Problem, random_problem, relative_error


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclasses.dataclass
class CrossFrameworkResult:
    """What one cross-framework round produced (outputs are host float64 arrays)."""

    writer: str
    zero_copy: bool
    reference: np.ndarray
    torch_out: np.ndarray
    jax_out: np.ndarray
    torch_ms: float | None = None
    jax_ms: float | None = None

    @property
    def errors(self) -> dict:
        return {
            "torch vs reference": relative_error(self.torch_out, self.reference),
            "jax vs reference": relative_error(self.jax_out, self.reference),
            "torch vs jax": relative_error(self.torch_out, self.jax_out),
        }


def _median_ms(fn, sync, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_cross_framework(problem: Problem, *, writer: str, device: str = "cpu",
                        time_iters: int = 0, prefill_algorithm: str = "auto",
                        reference=None, implementation: str | None = None
                        ) -> CrossFrameworkResult:
    """Write `problem`'s new K/V with `writer` ("torch" or "jax"), attend from both.

    device: "cpu" (interpreted kernels) or "gpu". time_iters > 0 also times each attention.
    prefill_algorithm: the path both front ends take for the prefill tokens.
    reference: None for the float64 `reference_attention` on the host, or a function with its
      arguments (the cache: the physical JAX array) that computes the expected output.
    implementation: the JAX implementation (`jax_sparse.IMPLEMENTATIONS`); None: the
      platform's default.
    """
    import jax
    import torch

    import jax_sparse
    import torch_sparse

    from . import bridges

    spec, md = problem.spec, problem.metadata
    tdev = torch.device("cuda" if device == "gpu" else "cpu")
    jdev = jax.devices("gpu" if device == "gpu" else "cpu")[0]
    qdtype = str(problem.query.dtype)
    num_blocks = problem.kv_cache.shape[0]
    t_md = bridges.to_torch(md, tdev)
    j_md = bridges.to_jax(md, jdev)

    def scales(to):
        return [None if s is None else (s if isinstance(s, float) else to(s))
                for s in (problem.k_scale, problem.v_scale)]
    t_ks, t_vs = scales(lambda s: bridges.to_torch(s, tdev))
    j_ks, j_vs = scales(lambda s: bridges.to_jax(s, jdev))

    if writer == "torch":
        t_cache = bridges.allocate_torch_kv_cache(spec, num_blocks, qdtype, device=tdev)
        t_cache.copy_(bridges.kv_cache_to_torch(problem.kv_cache, spec).to(tdev))
        torch_sparse.write_kv(t_cache, bridges.to_torch(problem.key, tdev),
                              bridges.to_torch(problem.value, tdev), t_md.slot_mapping, spec,
                              k_scale=t_ks, v_scale=t_vs)
        j_cache = bridges.kv_cache_to_jax(t_cache, spec)
        zero_copy = j_cache.unsafe_buffer_pointer() == t_cache.data_ptr()
    elif writer == "jax":
        write = jax.jit(jax_sparse.write_kv, static_argnums=(4,), donate_argnums=(0,))
        j_cache = write(bridges.to_jax(problem.kv_cache, jdev, copy=True),
                        bridges.to_jax(problem.key, jdev), bridges.to_jax(problem.value, jdev),
                        j_md.slot_mapping, spec, j_ks, j_vs)
        t_cache = bridges.kv_cache_to_torch(j_cache, spec)
        zero_copy = j_cache.unsafe_buffer_pointer() == t_cache.data_ptr()
    else:
        raise ValueError(f"writer {writer!r} is unknown; expected 'torch' or 'jax'")

    t_query = bridges.to_torch(problem.query, tdev)
    j_query = bridges.to_jax(problem.query, jdev)
    t_topk = bridges.to_torch(problem.topk_indices, tdev)
    j_topk = bridges.to_jax(problem.topk_indices, jdev)
    t_out = torch.full_like(t_query, float("nan"))

    def torch_call():
        return torch_sparse.sparse_attention(spec, t_query, t_cache, t_topk, t_md, t_out,
                                             k_scale=t_ks, v_scale=t_vs,
                                             prefill_algorithm=prefill_algorithm)
    def jax_call():  # jitted inside
        return jax_sparse.sparse_attention(spec, j_query, j_cache, j_topk, j_md, k_scale=j_ks,
                                           v_scale=j_vs, prefill_algorithm=prefill_algorithm,
                                           implementation=implementation)

    torch_call()
    j_out = jax_call().block_until_ready()
    ref_cache = j_cache if reference else np.asarray(j_cache)
    expected = (reference or reference_attention)(spec, problem.query, ref_cache,
                                                  problem.topk_indices, md, problem.k_scale,
                                                  problem.v_scale)
    result = CrossFrameworkResult(
        writer=writer, zero_copy=bool(zero_copy),
        reference=np.asarray(expected, np.float64),
        torch_out=t_out.float().cpu().numpy().astype(np.float64),
        jax_out=np.asarray(j_out).astype(np.float64))
    if time_iters:
        tsync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
        result.torch_ms = _median_ms(torch_call, tsync, 3, time_iters)
        result.jax_ms = _median_ms(lambda: jax_call().block_until_ready(), lambda: None, 3,
                                   time_iters)
    return result


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
