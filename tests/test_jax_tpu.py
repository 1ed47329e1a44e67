"""jax_sparse implementation="tpu" (Pallas TPU) in interpret mode on CPU: the float64 reference,
the Pallas (Triton backend) and XLA implementations on the same inputs, the TPU interpreter's
out-of-bounds checks, the plan alone, and lowering of the real kernel for TPU."""
import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, poison_unused_slots, relative_error

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

import jax_sparse  # noqa: E402
from jax_sparse.selection import key_mask, select_pages  # noqa: E402
from jax_sparse.tpu import paged_sparse_attention_tpu, plan_tpu, sparse_attention_tpu  # noqa: E402
from tests.helpers import MIXED_BATCHES, TOL  # noqa: E402
from tests.helpers import check as _check  # noqa: E402
from tests.helpers import garbage_topk as _garbage_topk  # noqa: E402
from tests.helpers import jax_run as _run  # noqa: E402
from tests.helpers import jax_scales as _scales  # noqa: E402
from tests.helpers import problem as _problem  # noqa: E402
from tests.helpers import reference as _reference  # noqa: E402
from tests.helpers import same_shape_batches as _same_shape_batches  # noqa: E402


def _run_tpu(problem, **kw):
    """paged_sparse_attention_tpu directly (its knobs), scales as the front end passes them."""
    md = interop.to_jax(problem.metadata)
    n = problem.query.shape[0]
    k_scale, v_scale = (None if s is None else s.reshape(-1) if s.ndim < 2 else s
                        for s in _scales(problem))
    return paged_sparse_attention_tpu(
        problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), md.token_to_req[:n], md.token_positions[:n],
        md.block_table, k_scale, v_scale, **kw)


# --- parity: reference, Pallas (Triton, interpreted) and XLA on the same inputs ---------------

@pytest.mark.parametrize("cache, layout, heads, scale_mode", [
    ("auto", "NHD", (16, 1), "none"),
    ("float16", "HND", (8, 2), "none"),          # GQA group 4
    ("fp8_e4m3", "HND", (12, 2), "per_slot"),    # GQA group 6
    ("fp8_e5m2", "NHD", (16, 2), "scalar"),      # GQA group 8
    ("fp8_e4m3", "NHD", (16, 1), "per_slot"),
    ("fp8_e5m2", "HND", (64, 4), "per_slot"),    # GQA group 16, M3's heads
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_tpu_parity_mixed_batch(rng, cache, layout, heads, scale_mode):
    """Decodes and prefill chunks in one batch, padding tokens, sentinels anywhere in a row,
    future blocks, empty rows."""
    problem = _problem(rng, cache, layout, heads, num_tokens=40, scale_mode=scale_mode,
                       scatter=True, future_fraction=0.4, empty_fraction=0.1)
    label = f"tpu {cache} {layout} {heads} {scale_mode}"
    out = _run(problem, "tpu")
    _check(out, _reference(problem), label)
    # XLA (an independent gather) on every case; the Pallas Triton-backend kernel, interpreted
    # at a few seconds a case, on the M3-headed one (each is checked against the float64
    # reference on every cache dtype and layout in tests/test_jax_token.py).
    for impl in ("pallas", "xla") if heads == (64, 4) else ("xla",):
        other = np.asarray(_run(problem, impl), np.float64)
        err = relative_error(np.asarray(out, np.float64), other)
        assert err < TOL, f"{label}: differs from {impl} by {err:.3g}"


# --- speculative decode, garbage entries, NaN slots under the TPU interpreter -----------------

@pytest.mark.parametrize("layout, cache, scale_mode", [("NHD", "fp8_e4m3", "per_slot"),
                                                       ("HND", "auto", "none")])
def test_tpu_speculative_decode_garbage_nan_interpret_params(rng, layout, cache, scale_mode):
    """pltpu.InterpretParams: simulated DMAs and semaphores, an error on any out-of-bounds
    read; top-k junk and block-table entries outside the cache must never become a DMA, and
    NaN in every slot no token may attend must not reach the output."""
    problem = _problem(rng, cache, layout, (16, 1), topk=8, decode_query_len=3,
                       query_lens=[3, 3, 3, 10], seq_lens=[390, 131, 3, 400], num_tokens=24,
                       scale_mode=scale_mode, scatter=True)
    problem.topk_indices = _garbage_topk(problem, rng)
    clean = problem.kv_cache
    poison_unused_slots(problem)
    table = problem.metadata.block_table.copy()
    num_blocks = problem.kv_cache.shape[0]
    table[0, 0], table[1, 1], table[3, 2] = num_blocks + 5, -3, 2**31 - 1
    problem.metadata = problem.metadata.replace(block_table=table)
    ref = _reference(problem, kv_cache=clean)
    _check(_run_tpu(problem, interpret=pltpu.InterpretParams()), ref,
           f"tpu {layout} {cache} speculative decode, garbage, NaN")


def test_tpu_empty_rows_and_padding_give_zeros(rng):
    problem = _problem(rng, "fp8_e4m3", num_tokens=20, scale_mode="per_slot",
                       query_lens=[1, 1, 9], seq_lens=[300, 5, 200], empty_fraction=1.0)
    out = np.asarray(_run(problem, "tpu"), np.float64)
    assert np.isfinite(out).all() and not out.any(), "tpu: rows with no entry are not zeros"


@pytest.mark.parametrize("tile_tokens, pipeline_depth", [(1, 2), (3, 3), (16, 2)])
def test_tpu_tiles_and_ring_depths(rng, tile_tokens, pipeline_depth):
    """Tiles that do not divide the tokens, double buffering and deeper rings."""
    problem = _problem(rng, "fp8_e5m2", "HND", (8, 2), num_tokens=22, scale_mode="per_slot",
                       query_lens=[2, 2, 13], seq_lens=[260, 129, 400], decode_query_len=2,
                       scatter=True, future_fraction=0.3, empty_fraction=0.1)
    _check(_run_tpu(problem, tile_tokens=tile_tokens, pipeline_depth=pipeline_depth),
           _reference(problem), f"tpu tile {tile_tokens} depth {pipeline_depth}")


# --- the plan alone ---------------------------------------------------------------------------

def test_plan_tpu_lists_exactly_the_valid_entries(rng):
    problem = _problem(rng, topk=8, num_tokens=22, query_lens=[1, 1, 13],
                       seq_lens=[260, 129, 400], scatter=True, future_fraction=0.5,
                       empty_fraction=0.2)
    problem.topk_indices = _garbage_topk(problem, rng)
    spec, md, tile = problem.spec, problem.metadata, 4
    n = problem.query.shape[0]
    topk, req = jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req[:n])
    pos, table = jnp.asarray(md.token_positions[:n]), jnp.asarray(md.block_table)
    num_blocks = problem.kv_cache.shape[0]
    work, num_work = map(np.asarray, plan_tpu(spec, topk, req, pos, table,
                                              num_blocks=num_blocks, tile_tokens=tile))
    assert work.shape == (6, spec.num_kv_heads, 3, tile * spec.topk_blocks)
    assert num_work.shape == (6, spec.num_kv_heads, 1, 1)
    # Expected items: select_pages' valid entries in row order, keys counted from key_mask.
    safe_req = np.clip(md.token_to_req[:n], 0, table.shape[0] - 1)
    valid, block, page = select_pages(
        topk[:, :n], pos[None, :, None], lambda b: table[safe_req[None, :, None], b],
        block_size=spec.block_size, max_blocks=table.shape[1], num_blocks=num_blocks)
    keys = np.asarray(key_mask(valid, block, pos[None, :, None, None], spec.block_size)).sum(-1)
    valid, page = np.asarray(valid), np.asarray(page)
    for i in range(work.shape[0]):
        for g in range(spec.num_kv_heads):
            expected = [(page[g, t, e], keys[g, t, e], t - i * tile)
                        for t in range(i * tile, min(n, (i + 1) * tile))
                        for e in range(spec.topk_blocks) if valid[g, t, e]]
            count = int(num_work[i, g, 0, 0])
            got = [tuple(work[i, g, :, j]) for j in range(count)]
            assert got == expected, f"tile {i} head {g}: work items {got} != {expected}"
            assert not work[i, g, :, count:].any(), f"tile {i} head {g}: junk past num_work"


# --- the public front end: jit, no recompilation, algorithms, bad input -----------------------

def test_tpu_no_recompile_across_batches(rng):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4)
    traces = []

    @jax.jit
    def step(query, kv_cache, topk, metadata):
        traces.append(1)
        return jax_sparse.sparse_attention(spec, query, kv_cache, topk, metadata,
                                           implementation="tpu")

    for i, (query, cache, topk, md) in enumerate(
            _same_shape_batches(rng, spec, MIXED_BATCHES[:3])):
        out = step(jnp.asarray(query), jnp.asarray(cache), jnp.asarray(topk), interop.to_jax(md))
        _check(out, interop.reference_attention(spec, query, cache, topk, md), f"batch {i}")
    assert len(traces) == 1 and step._cache_size() == 1, "tpu: recompiled across batches"


def test_tpu_prefill_algorithm_checked(rng):
    problem = _problem(rng, num_tokens=8, query_lens=[1, 4], seq_lens=[200, 9])
    for algorithm in ("auto", "token", "union", "k2q"):  # one kernel for every value
        jax.eval_shape(lambda q: _run(problem, "tpu", prefill_algorithm=algorithm),
                       problem.query)
    md = interop.to_jax(problem.metadata)
    args = (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md.token_to_req[:8], md.token_positions[:8],
            md.block_table, None, None)
    with pytest.raises(ValueError, match=r"prefill_algorithm 'tiles' is unknown"):
        sparse_attention_tpu(*args, num_decode_tokens=1, prefill_algorithm="tiles")
    with pytest.raises(ValueError, match=r"pipeline_depth \(1\) must be >= 2"):
        paged_sparse_attention_tpu(*args, pipeline_depth=1)
    with pytest.raises(ValueError, match=r"tile_tokens \(0\) must be >= 1"):
        paged_sparse_attention_tpu(*args, tile_tokens=0)


# --- the real kernel lowers for TPU (no TPU needed; Mosaic's own passes run at compile) -------

@pytest.mark.parametrize("heads", [(64, 4), (16, 1), (12, 2)], ids=["64-4", "16-1", "12-2"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, scale_mode", [("auto", "none"), ("float16", "none"),
                                               ("fp8_e4m3", "per_slot"),
                                               ("fp8_e5m2", "scalar")])
def test_tpu_kernel_lowers_for_tpu(heads, layout, cache, scale_mode):
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    query_dtype = matching_query_dtype(cache)
    sds, i32, kv_heads = jax.ShapeDtypeStruct, jnp.int32, heads[1]
    scale = {"none": None, "scalar": sds((1,), jnp.float32),
             "per_slot": sds((kv_heads, 40 * 128), jnp.float32)}[scale_mode]
    args = (sds((20, heads[0], 128), query_dtype),
            sds(spec.physical_kv_cache_shape(40), spec.cache_storage_dtype(query_dtype)),
            sds((kv_heads, 20, 16), i32), sds((20,), i32), sds((20,), i32), sds((3, 20), i32),
            scale, scale)

    def call(*a):
        return paged_sparse_attention_tpu(spec, *a, interpret=False)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the TPU lowering"


@pytest.mark.parametrize("backend, expected", [("tpu", "tpu"), ("gpu", "pallas"),
                                               ("cpu", "pallas"), ("rocm_like", "xla")])
def test_default_implementation_per_platform(monkeypatch, backend, expected):
    """On a TPU backend the default is the Pallas TPU kernel; GPU and CPU keep Pallas
    (Triton backend; interpret mode on CPU); any other platform gets XLA."""
    monkeypatch.setattr(jax_sparse.api.jax, "default_backend", lambda: backend)
    assert jax_sparse.default_implementation() == expected, backend
