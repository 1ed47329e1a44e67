"""One paged cache, written by one framework and attended by both: the harness that the demo
(`examples/demo.py`) and the cross-framework parity tests (`tests/test_parity.py`) share. With
the demo it is the only code that imports both front ends; `interop` imports neither."""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

from interop import bridges
from interop.reference import reference_attention
from interop.testing import Problem, relative_error


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


