"""Cross-framework parity: one cache, written by either framework, attended by the Triton and
the Pallas kernels without a copy; both compared with each other and the float64 reference."""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, random_problem, relative_error

pytest.importorskip("torch")
pytest.importorskip("jax")
from examples.cross_framework import run_cross_framework  # noqa: E402
from tests.device_reference import jax_reference, torch_reference  # noqa: E402

CACHE = ["auto", "float16", "fp8_e4m3", "fp8_e5m2"]
TOL = 1e-2  # bf16/fp16 queries and P in the dot products; fp8 values are exact in bf16


def _check(problem, writer, device, label, prefill_algorithm="auto", reference=None,
           implementation=None):
    """reference: None (float64 on the host) or a device reference (the M3-shaped GPU cases,
    where the float64 one takes many seconds); implementation: the JAX side's (None: the
    platform's default)."""
    res = run_cross_framework(problem, writer=writer, device=device,
                              prefill_algorithm=prefill_algorithm, reference=reference,
                              implementation=implementation)
    assert res.zero_copy, f"{label}: the cache crossed frameworks through a copy"
    errs = res.errors
    assert max(errs.values()) < TOL, f"{label}: {errs}"
    rows = problem.metadata.num_actual_tokens
    assert np.isfinite(res.torch_out[:rows]).all() and np.isfinite(res.jax_out[:rows]).all()


# Every cache dtype in both layouts once, the writer, the GQA group, speculative decodes and the
# FP8 scale modes taking turns. (writer, cache, layout, scale_mode, heads, decode_query_len)
CPU_CASES = [
    ("torch", "auto", "NHD", "none", (8, 2), 1),
    ("jax", "auto", "HND", "none", (16, 1), 2),
    ("jax", "float16", "NHD", "none", (16, 1), 1),
    ("torch", "float16", "HND", "none", (8, 2), 2),
    ("torch", "fp8_e4m3", "NHD", "scalar", (8, 2), 2),
    ("jax", "fp8_e4m3", "HND", "per_slot", (16, 1), 1),
    ("jax", "fp8_e5m2", "NHD", "per_slot", (8, 2), 2),
    ("torch", "fp8_e5m2", "HND", "scalar", (16, 1), 1),
]


@pytest.mark.parametrize("writer, cache, layout, scale_mode, heads, decode_query_len", CPU_CASES,
                         ids=["-".join(str(v).replace(" ", "") for v in c) for c in CPU_CASES])
def test_parity_cpu(rng, writer, cache, layout, scale_mode, heads, decode_query_len):
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=4, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    L = decode_query_len
    problem = random_problem(spec, [L, L, 9, 5], [300, 128 + L, 209, 5], rng,
                             decode_query_len=L, query_dtype=matching_query_dtype(cache),
                             scale_mode=scale_mode, scatter=True, future_fraction=0.3,
                             empty_fraction=0.05)
    _check(problem, writer, "cpu", f"{writer} {cache} {layout} {scale_mode} {heads} L={L}")


@pytest.mark.parametrize("algorithm, cache, layout, writer", [
    ("union", "auto", "HND", "torch"), ("k2q", "fp8_e4m3", "NHD", "jax")])
def test_parity_cpu_prefill_algorithms(rng, algorithm, cache, layout, writer):
    """The union and key-to-query paths of both front ends on one cache, correlated and
    scattered rows, tiles that straddle requests."""
    spec = interop.SparseAttentionSpec(16, 1, topk_blocks=4, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1, 1, 13, 20], [300, 129, 270, 20], rng,
                             query_dtype=matching_query_dtype(cache), rho=0.87,
                             future_fraction=0.3, empty_fraction=0.05,
                             scale_mode="per_slot" if cache != "auto" else "none")
    _check(problem, writer, "cpu", f"{algorithm} {writer} {cache} {layout}", algorithm)


@pytest.mark.parametrize("cache, layout, writer, scale_mode", [
    ("auto", "NHD", "torch", "none"), ("fp8_e4m3", "HND", "jax", "per_slot")])
def test_parity_cpu_tpu_implementation(rng, cache, layout, writer, scale_mode):
    """The Pallas TPU kernel (interpret mode) on a cache both frameworks share, against the
    Triton kernels and the reference: a mixed batch with junk and empty rows."""
    spec = interop.SparseAttentionSpec(16, 1, topk_blocks=4, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1, 1, 9, 5], [300, 129, 209, 5], rng,
                             query_dtype=matching_query_dtype(cache), scatter=True,
                             future_fraction=0.3, empty_fraction=0.05, scale_mode=scale_mode)
    _check(problem, writer, "cpu", f"tpu {writer} {cache} {layout}", implementation="tpu")


@pytest.mark.gpu
@pytest.mark.parametrize("cache, layout, writer, scale_mode", [
    ("auto", "NHD", "torch", "none"), ("fp8_e4m3", "HND", "jax", "per_slot"),
    ("fp8_e5m2", "NHD", "torch", "scalar")])
def test_parity_gpu_mosaic_implementation(rng, cache, layout, writer, scale_mode):
    """The Mosaic GPU kernel against the Triton kernels on one cache at MiniMax-M3 shapes."""
    pytest.importorskip("absl")
    from jax_sparse import mosaic
    if mosaic.mosaic_unavailable_reason():
        pytest.skip(mosaic.mosaic_unavailable_reason())
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1] * 6 + [160, 90], [32768, 9000, 129, 2000, 20000, 5, 160, 4400],
                             rng, query_dtype=matching_query_dtype(cache), scatter=True,
                             future_fraction=0.2, empty_fraction=0.01, scale_mode=scale_mode)
    _check(problem, writer, "gpu", f"mosaic {writer} {cache} {layout}", reference=jax_reference,
           implementation="mosaic")


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
    _check(problem, writer, "gpu", f"gpu {writer} {cache} {layout}", reference=jax_reference)


@pytest.mark.gpu
@pytest.mark.parametrize("writer", ["torch", "jax"])
def test_parity_gpu_16_1_speculative(rng, writer):
    spec = interop.SparseAttentionSpec(16, 1, topk_blocks=16, kv_cache_dtype="fp8_e4m3")
    problem = random_problem(spec, [2] * 8 + [300], [32768] * 4 + [3000] * 4 + [5000], rng,
                             decode_query_len=2, scale_mode="per_slot")
    _check(problem, writer, "gpu", f"gpu 16/1 spec-decode {writer}", reference=jax_reference)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, scale_mode", [("auto", "none"), ("fp8_e4m3", "per_slot"),
                                               ("fp8_e5m2", "scalar")])
def test_parity_gpu_prefill_algorithms(rng, cache, scale_mode, layout):
    """Every prefill path of both front ends on one cache at MiniMax-M3 shapes, correlated
    selections, a prefill large enough for "auto" to use all three kernels, against a float32
    reference computed on the device (the float64 one would take minutes here)."""
    import jax.numpy as jnp
    import torch

    import jax_sparse
    import torch_sparse
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problem = random_problem(spec, [1] * 4 + [1500, 2700, 9], [32768, 9000, 129, 2000, 2100,
                             2700, 9 + 128 * 3], rng, scale_mode=scale_mode, rho=0.87,
                             future_fraction=0.1, empty_fraction=0.01)
    cache_t = interop.kv_cache_to_torch(problem.kv_cache, spec).cuda()
    cache_j = interop.kv_cache_to_jax(cache_t, spec)
    md_t, md_j = interop.to_torch(problem.metadata, "cuda"), interop.to_jax(problem.metadata)
    q_t = interop.to_torch(problem.query, "cuda")
    topk_t = torch.as_tensor(problem.topk_indices, device="cuda")
    scales_t = [None if s is None else torch.as_tensor(np.asarray(s, np.float32), device="cuda")
                for s in (problem.k_scale, problem.v_scale)]
    ref = torch_reference(spec, q_t, cache_t, topk_t, md_t, *scales_t)
    scales_j = [None if s is None else interop.to_jax(s) for s in scales_t]
    for algorithm in interop.PREFILL_ALGORITHMS:
        out_t = torch.full_like(q_t, float("nan"))
        torch_sparse.sparse_attention(spec, q_t, cache_t, topk_t, md_t, out_t,
                                      k_scale=scales_t[0], v_scale=scales_t[1],
                                      prefill_algorithm=algorithm)
        out_t = out_t.float().cpu().numpy()
        out_j = np.asarray(jax_sparse.sparse_attention(
            spec, interop.to_jax(q_t), cache_j, jnp.asarray(problem.topk_indices), md_j,
            k_scale=scales_j[0], v_scale=scales_j[1], prefill_algorithm=algorithm)
            .astype(jnp.float32))
        errors = {"torch": relative_error(out_t, ref), "jax": relative_error(out_j, ref),
                  "torch vs jax": relative_error(out_t, out_j)}
        assert max(errors.values()) < TOL, f"{algorithm} {cache} {layout}: {errors}"


@pytest.mark.parametrize("argv", [
    # The README's bare command (CPU defaults: a 66-token batch, interpreted 4 times a front
    # end): in the `slow` run.
    pytest.param([], marks=pytest.mark.slow, id="readme-defaults"),
    pytest.param(["--writer", "jax", "--layout", "HND", "--cache-dtype", "fp8_e5m2", "--scale",
                  "per_slot", "--heads", "8/2", "--decodes", "1", "--decode-query-len", "2",
                  "--prefills", "9:130", "--iters", "1"], id="options"),
])
def test_demo_cli(capsys, argv):
    from examples.demo import main
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert main(device + argv) == 0
    report = capsys.readouterr().out
    assert "without a copy: yes" in report and "parity: OK" in report, report
