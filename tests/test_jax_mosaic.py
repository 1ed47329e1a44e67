"""jax_sparse's Mosaic GPU kernels (`implementation="mosaic"`).

CPU: the plan the kernel walks (`plan_pages`) against a NumPy derivation of the contract, the
availability check and the error a forced "mosaic" gives without a Hopper GPU, and the real
kernels lowered for CUDA (every cache dtype, scale mode, layout and split count). Mosaic GPU's
CPU interpreter is private and does not take these kernels, so running them needs the GPU:
the `gpu` tests compare with the float32 device reference (tests/device_reference.py, checked
against the float64 one on CPU) and with implementation="pallas" at MiniMax-M3 shapes.
"""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, poison_unused_slots

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_sparse  # noqa: E402
from jax_sparse import mosaic  # noqa: E402

from tests.helpers import check as _check  # noqa: E402
from tests.helpers import garbage_topk as _garbage_topk  # noqa: E402
from tests.helpers import jax_device_reference as _device_reference  # noqa: E402
from tests.helpers import jax_run as _run  # noqa: E402
from tests.helpers import problem as _problem  # noqa: E402

ON_HOPPER = mosaic.mosaic_available()
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs Mosaic GPU on a Hopper GPU: "
                                  f"{mosaic.mosaic_unavailable_reason()}")


def _plgpu_importable():
    try:
        mosaic._plgpu()
        return True
    except Exception:  # noqa: BLE001
        return False


needs_plgpu = pytest.mark.skipif(not _plgpu_importable(),
                                 reason="jax.experimental.pallas.mosaic_gpu does not import")


# --- host-side logic (CPU) ---------------------------------------------------------------------

def _expected_plan(problem):
    """The plan from the contract, row by row in NumPy: valid entries' pages in row order and
    the number of keys j <= position in each."""
    md, bs = problem.metadata, problem.spec.block_size
    table, num_blocks = md.block_table, problem.kv_cache.shape[0]
    topk = problem.topk_indices
    pages = np.zeros(topk.shape, np.int64)
    keys = np.zeros(topk.shape, np.int64)
    counts = np.zeros(topk.shape[:2], np.int64)
    for g in range(topk.shape[0]):
        for t in range(md.num_tokens):
            pos, req = int(md.token_positions[t]), int(md.token_to_req[t])
            n = 0
            for b in topk[g, t]:
                if not (0 <= b <= pos // bs and b < table.shape[1]):
                    continue
                page = int(table[req, b])
                if not 0 <= page < num_blocks:
                    continue
                pages[g, t, n], keys[g, t, n] = page, min(pos - b * bs + 1, bs)
                n += 1
            counts[g, t] = n
    return pages, keys, counts


@pytest.mark.parametrize("heads", [(8, 2), (16, 1)], ids=["gqa4", "gqa16"])
def test_plan_pages_matches_contract(rng, heads):
    problem = _problem(rng, heads=heads, topk=16, num_tokens=40, scatter=True,
                       future_fraction=0.4, empty_fraction=0.1)
    problem.topk_indices = _garbage_topk(problem, rng)
    table = problem.metadata.block_table.copy()
    table[0, 0], table[3, 1], table[2, 4] = problem.kv_cache.shape[0] + 5, -3, 2**31 - 1
    problem.metadata = problem.metadata.replace(block_table=table)
    md = problem.metadata
    pages, keys, counts = jax.jit(mosaic.plan_pages, static_argnums=(0, 5))(
        problem.spec, jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
        jnp.asarray(md.token_positions), jnp.asarray(table), problem.kv_cache.shape[0])
    exp_pages, exp_keys, exp_counts = _expected_plan(problem)
    assert np.array_equal(np.asarray(counts), exp_counts), "valid entries per row differ"
    walked = np.arange(pages.shape[-1]) < exp_counts[..., None]
    assert np.array_equal(np.where(walked, pages, 0), np.where(walked, exp_pages, 0)), \
        "pages of the valid entries differ"
    assert np.array_equal(np.asarray(keys), exp_keys), "attended keys per page differ"
    assert np.asarray(counts).max() > 0 and (np.asarray(counts) == 0).any(), "weak problem"


def test_query_rows():
    assert mosaic.query_rows(16) == (16, 64)
    assert mosaic.query_rows(4) == (8, 64)
    assert mosaic.query_rows(64) == (64, 64)
    assert mosaic.query_rows(72) == (72, 128)


@needs_plgpu
def test_stages_fit_shared_memory(rng):
    """The shared-memory count matches what Mosaic GPU asked for on the H100; default
    pipelines fit every cache dtype and output kind; a deeper one than fits is a ValueError
    before any launch."""
    kw = dict(rows=64, block_size=128, head_size=128, compute_dtype=jnp.bfloat16)
    bf16 = dict(kw, cache_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, per_slot=False)
    assert mosaic.smem_bytes(mosaic.scratch_layout(3, **bf16)) == 232504  # H100, jax 0.11.2
    for cache, stages in ((jnp.bfloat16, mosaic.PAGES_IN_FLIGHT_16BIT),
                          (jnp.float8_e4m3fn, mosaic.PAGES_IN_FLIGHT_FP8)):
        for out in (jnp.bfloat16, jnp.float32):
            layout = mosaic.scratch_layout(stages, cache_dtype=cache, out_dtype=out,
                                           per_slot=True, **kw)
            assert mosaic.smem_bytes(layout) <= mosaic.SMEM_BYTES, (cache, out)
    problem = _problem(rng, "fp8_e4m3", scale_mode="per_slot")
    with pytest.raises(ValueError, match=r"pages_in_flight 5 needs \d+ bytes of shared memory"):
        spec, *args = _kernel_args(problem)
        jax.eval_shape(lambda *a: mosaic.paged_sparse_attention_mosaic(
            spec, *a, pages_in_flight=5), *args)


@pytest.mark.skipif(ON_HOPPER, reason="Mosaic GPU can run here")
def test_forced_mosaic_without_hopper_says_why(rng):
    reason = mosaic.mosaic_unavailable_reason()
    assert reason, "no reason given"
    problem = _problem(rng)
    with pytest.raises(RuntimeError, match='implementation="mosaic" cannot run here: '
                       + reason.split(" (")[0][:40]):
        _run(problem, "mosaic")


def test_bad_prefill_algorithm_with_mosaic(rng):
    problem = _problem(rng)
    with pytest.raises(ValueError, match=r"prefill_algorithm 'tiles' is unknown"):
        _run(problem, "mosaic", prefill_algorithm="tiles")


@needs_plgpu
@pytest.mark.parametrize("heads, layout, cache, scale_mode, splits", [
    ((64, 4), "NHD", "auto", "none", 1),
    ((64, 4), "HND", "auto", "none", 2),
    ((16, 1), "NHD", "float16", "none", 4),
    ((8, 2), "HND", "auto", "none", 1),
    ((64, 4), "NHD", "fp8_e4m3", "none", 2),
    ((64, 4), "HND", "fp8_e4m3", "per_slot", 1),
    ((16, 1), "NHD", "fp8_e4m3", "scalar", 2),
    ((16, 1), "HND", "fp8_e5m2", "per_slot", 2),
    ((8, 2), "NHD", "fp8_e5m2", "scalar", 1),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_mosaic_lowers_for_cuda(heads, layout, cache, scale_mode, splits):
    """The real kernel lowers through Pallas' Mosaic GPU backend for CUDA, no GPU needed."""
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    query_dtype = matching_query_dtype(cache)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    scale = {"none": None, "scalar": sds((1,), jnp.float32),
             "per_slot": sds((heads[1], 40 * 128), jnp.float32)}[scale_mode]
    args = (sds((8, heads[0], 128), query_dtype),
            sds(spec.physical_kv_cache_shape(40), spec.cache_storage_dtype(query_dtype)),
            sds((heads[1], 8, 16), i32), sds((8,), i32), sds((8,), i32), sds((2, 20), i32),
            scale, scale)

    def call(*a):
        return mosaic.paged_sparse_attention_mosaic(spec, *a, num_splits=splits)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text, "no Mosaic GPU kernel in the CUDA lowering"


# --- GPU: compiled Mosaic GPU kernels ---------------------------------------------------------

M3_HEADS = [(64, 4), (16, 1)]
M3_CACHES = [("auto", "none"), ("float16", "none"), ("fp8_e4m3", "none"),
             ("fp8_e4m3", "scalar"), ("fp8_e4m3", "per_slot"), ("fp8_e5m2", "scalar"),
             ("fp8_e5m2", "per_slot")]


def _check_both(problem, label, **kw):
    """Mosaic against the device reference and against the Pallas (Triton) kernel."""
    ref = _device_reference(problem)
    out = np.asarray(_run(problem, "mosaic", **kw), np.float64)
    _check(out, ref, f"mosaic {label}")
    pallas = np.asarray(_run(problem, "pallas"), np.float64)
    diff = np.linalg.norm(out - pallas) / max(np.linalg.norm(pallas), 1e-30)
    assert diff < 1e-2, f"mosaic {label}: {diff:.3g} from pallas"


# Every (cache, scale mode) in both layouts, the two M3 head shapes taking turns (each Mosaic
# GPU and Triton compile is seconds: the full cross product would double them for nothing the
# kernels branch on). Every FP8 format meets both head shapes in both layouts.
M3_ROWS = [(heads, layout, cache, scale_mode)
           for i, (cache, scale_mode) in enumerate(M3_CACHES)
           for j, layout in enumerate(("NHD", "HND"))
           for heads in [M3_HEADS[(i + j) % 2]]]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("heads, layout, cache, scale_mode", M3_ROWS,
                         ids=[f"{h[0]}-{h[1]}-{layout}-{c}-{s}" for h, layout, c, s in M3_ROWS])
def test_gpu_m3_mixed_batch(rng, heads, layout, cache, scale_mode):
    """Decodes (one at 32k) and two prefill chunks in one call; scattered sentinels, future
    blocks, empty rows."""
    problem = _problem(rng, cache, layout, heads, topk=16, query_lens=[1] * 5 + [150, 60],
                       seq_lens=[32768, 9000, 129, 2000, 5, 300, 4400], scale_mode=scale_mode,
                       scatter=True, future_fraction=0.2, empty_fraction=0.02)
    _check_both(problem, f"{cache} {scale_mode} {layout} {heads}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("num_splits", [1, 2, 4, 8, 16])
def test_gpu_splits(rng, num_splits):
    problem = _problem(rng, "fp8_e4m3", "HND", (64, 4), topk=16, query_lens=[1] * 4 + [40],
                       seq_lens=[9000, 129, 2000, 300, 4400], scale_mode="per_slot",
                       scatter=True, future_fraction=0.3, empty_fraction=0.1)
    out = mosaic.paged_sparse_attention_mosaic(*_kernel_args(problem), num_splits=num_splits)
    _check(out, _device_reference(problem), f"mosaic num_splits={num_splits}")


def _kernel_args(problem):
    md = interop.to_jax(problem.metadata)
    scales = [None if s is None else jnp.asarray(s, jnp.float32) for s in
              (problem.k_scale, problem.v_scale)]
    scales = [None if s is None else s.reshape(1) if s.ndim < 2 else s for s in scales]
    n = problem.query.shape[0]
    return (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md.token_to_req[:n], md.token_positions[:n],
            md.block_table, *scales)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cache, scale_mode, stages", [
    ("auto", "none", 1), ("fp8_e5m2", "per_slot", 2), ("fp8_e4m3", "scalar", 1)])
def test_gpu_pipeline_depths(rng, cache, scale_mode, stages):
    """Pages in flight other than the default: 1 (no prefetch), deeper rings (slots reused
    many times over 16 pages)."""
    problem = _problem(rng, cache, "NHD", (64, 4), topk=16, query_lens=[1] * 4 + [40],
                       seq_lens=[9000, 129, 2000, 300, 4400], scale_mode=scale_mode,
                       scatter=True, future_fraction=0.3, empty_fraction=0.05)
    out = mosaic.paged_sparse_attention_mosaic(*_kernel_args(problem), num_splits=1,
                                               pages_in_flight=stages)
    _check(out, _device_reference(problem), f"mosaic {cache} pages_in_flight={stages}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cache, layout", [("auto", "NHD"), ("fp8_e5m2", "HND")])
def test_gpu_speculative_decode(rng, cache, layout):
    problem = _problem(rng, cache, layout, (16, 1), topk=16, decode_query_len=2,
                       query_lens=[2] * 8 + [100], seq_lens=[32768] * 2 + [3000] * 6 + [5000],
                       scale_mode="per_slot" if cache != "auto" else "none")
    _check_both(problem, f"speculative {cache} {layout}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("heads", [(8, 2), (16, 4)], ids=["gqa4-8-2", "gqa4-16-4"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_garbage_and_poisoned_slots(rng, heads, layout):
    """Junk top-k entries and block-table entries; every slot no token may attend holds NaN;
    a GQA group of 4 (padded to 8 rows for copies, 64 for wgmma)."""
    problem = _problem(rng, "auto", layout, heads, topk=16, num_tokens=48, scatter=True)
    problem.topk_indices = _garbage_topk(problem, rng)
    poisoned = dataclasses.replace(problem)  # the slots the batch's own table leaves unused
    poison_unused_slots(poisoned)
    table = problem.metadata.block_table.copy()
    table[0, 0], table[3, 1], table[2, 4] = problem.kv_cache.shape[0] + 5, -3, 2**31 - 1
    problem.metadata = problem.metadata.replace(block_table=table)
    ref = _device_reference(problem)
    problem.kv_cache = poisoned.kv_cache
    _check(_run(problem, "mosaic"), ref, f"mosaic garbage {heads} {layout}")


@pytest.mark.gpu
@needs_hopper
def test_gpu_empty_rows_and_padding_give_zeros(rng):
    problem = _problem(rng, "fp8_e4m3", heads=(64, 4), topk=16, num_tokens=48,
                       empty_fraction=1.0, scale_mode="per_slot")
    out = np.asarray(_run(problem, "mosaic"), np.float64)
    assert np.isfinite(out).all() and not out.any(), "rows with no entry are not zeros"


@pytest.mark.gpu
@needs_hopper
def test_gpu_seed_decode_call(rng):
    problem = _problem(rng, "fp8_e4m3", "NHD", (64, 4), topk=16, query_lens=[1] * 6,
                       seq_lens=[32768, 129, 3000, 7, 900, 20000], scale_mode="scalar")
    md, spec = problem.metadata, problem.spec
    scales = [jnp.asarray(s, jnp.float32) for s in (problem.k_scale, problem.v_scale)]
    out = jax_sparse.minimax_m3_sparse_attn_decode(
        jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), jnp.asarray(md.block_table),
        jnp.asarray(md.seq_lens), spec.num_kv_heads, spec.scale, 1, *scales,
        implementation="mosaic")
    _check(out, _device_reference(problem), "mosaic seed decode")
