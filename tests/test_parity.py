"""Cross-framework parity: one cache, written by either framework, attended by the Triton and
the Pallas kernels without a copy; both compared with each other and the float64 reference."""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, random_problem

pytest.importorskip("torch")
pytest.importorskip("jax")
from interop.demo import run_cross_framework  # noqa: E402

CACHE = ["auto", "float16", "fp8_e4m3", "fp8_e5m2"]
TOL = 1e-2  # bf16/fp16 queries and P in the dot products; fp8 values are exact in bf16


def _check(problem, writer, device, label):
    res = run_cross_framework(problem, writer=writer, device=device)
    assert res.zero_copy, f"{label}: the cache crossed frameworks through a copy"
    errs = res.errors
    assert max(errs.values()) < TOL, f"{label}: {errs}"
    rows = problem.metadata.num_actual_tokens
    assert np.isfinite(res.torch_out[:rows]).all() and np.isfinite(res.jax_out[:rows]).all()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("writer", ["torch", "jax"])
def test_parity_cpu(rng, writer, cache, layout):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1, 1, 9, 5], [300, 129, 209, 5], rng,
                             query_dtype=matching_query_dtype(cache), scatter=True,
                             future_fraction=0.3, empty_fraction=0.05)
    _check(problem, writer, "cpu", f"{writer} {cache} {layout}")


@pytest.mark.parametrize("scale_mode", ["scalar", "per_slot"])
@pytest.mark.parametrize("writer", ["torch", "jax"])
def test_parity_cpu_fp8_scales(rng, writer, scale_mode):
    spec = interop.SparseAttentionSpec(16, 1, topk_blocks=4, kv_cache_dtype="fp8_e4m3",
                                       kv_cache_layout="HND")
    problem = random_problem(spec, [2, 2, 7], [260, 2, 140], rng, decode_query_len=2,
                             scale_mode=scale_mode)
    _check(problem, writer, "cpu", f"{writer} fp8 {scale_mode}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("magnitude", [2.0 ** 17, 2.0 ** -30])
def test_parity_fp8_query_beyond_float16(rng, device, magnitude):
    """FP8 caches are attended in float16: a query far outside float16's range (overflow) or
    below it (underflow) must give the answer of the same problem at unit scale, since the
    kernels rescale each query row by a power of two (sm_scale undoes the magnitude)."""
    base = interop.SparseAttentionSpec(8, 2, topk_blocks=4, kv_cache_dtype="fp8_e4m3")
    spec = dataclasses.replace(base, sm_scale=base.scale / magnitude)
    problem = random_problem(spec, [1, 1, 9], [300, 129, 209], rng, scatter=True)
    query = (problem.query.astype(np.float32) * magnitude).astype(problem.query.dtype)
    _check(dataclasses.replace(problem, query=query), "torch", device, f"fp8 x{magnitude}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache", CACHE)
@pytest.mark.parametrize("writer", ["torch", "jax"])
def test_parity_gpu_m3_shapes(rng, writer, cache, layout):
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1] * 6 + [160, 90], [32768, 9000, 129, 2000, 20000, 5, 160, 4400],
                             rng, query_dtype=matching_query_dtype(cache), scatter=True,
                             future_fraction=0.2, empty_fraction=0.01)
    _check(problem, writer, "gpu", f"gpu {writer} {cache} {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("writer", ["torch", "jax"])
def test_parity_gpu_16_1_speculative(rng, writer):
    spec = interop.SparseAttentionSpec(16, 1, topk_blocks=16, kv_cache_dtype="fp8_e4m3")
    problem = random_problem(spec, [2] * 8 + [300], [32768] * 4 + [3000] * 4 + [5000], rng,
                             decode_query_len=2, scale_mode="per_slot")
    _check(problem, writer, "gpu", f"gpu 16/1 spec-decode {writer}")


@pytest.mark.parametrize("argv", [
    [],  # the README's bare command: CPU defaults
    ["--writer", "jax", "--layout", "HND", "--cache-dtype", "fp8_e5m2", "--scale", "per_slot",
     "--decode-query-len", "2", "--prefills", "20:130", "--iters", "1"],
])
def test_demo_cli(capsys, argv):
    from interop.demo import main
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert main(device + argv) == 0
    report = capsys.readouterr().out
    assert "without a copy: yes" in report and "parity: OK" in report, report
