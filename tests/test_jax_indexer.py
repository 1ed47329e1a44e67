"""jax_sparse.index_topk ("xla", and "pallas" and "tpu" in interpret mode on CPU) and write_index_k
against the float64 reference: exact rows (order and ties included) on small-integer data,
near-ties only on normal data; mixed decode-first batches, speculative decode, padding tokens
and requests, NaN in unvisited slots, FP8 caches, jit, donation, and bad inputs."""
import numpy as np
import pytest

import interop
from interop.indexer import IndexerSpec

from .indexer_cases import (assert_topk_equal, expected_after_write, random_index_problem,
                            write_case)

jax = pytest.importorskip("jax")
jnp = jax.numpy
import jax_sparse  # noqa: E402

IMPLS = ["xla", "pallas", "tpu"]
CACHE_DTYPES = [("auto", "bfloat16"), ("auto", "float16"), ("fp8_e4m3", "bfloat16")]


def _run(prob, implementation, **kw):
    md = interop.to_jax(prob.metadata)
    out = jax_sparse.index_topk(prob.ispec, jnp.asarray(prob.index_query),
                                jnp.asarray(prob.index_cache), md,
                                implementation=implementation, **kw)
    ref, scores = interop.reference_index_topk(prob.ispec, prob.index_query, prob.index_cache,
                                               prob.metadata)
    assert out.dtype == jnp.int32 and out.shape == ref.shape
    return np.asarray(out), ref, scores


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("heads, cache_dtype, query_dtype",
                         [(4, *c) for c in CACHE_DTYPES] + [(1, "auto", "bfloat16")])
def test_mixed_batch_matches_reference(rng, implementation, heads, cache_dtype, query_dtype):
    ispec = IndexerSpec(heads, topk_blocks=4, index_cache_dtype=cache_dtype)
    # Two decodes, then prefills (one crossing a block boundary), two padding tokens.
    prob = random_index_problem(ispec, [1, 1, 6, 3], [1100, 130, 262, 700], rng,
                                query_dtype=query_dtype, num_tokens=13)
    out, ref, scores = _run(prob, implementation)
    assert_topk_equal(out, ref, scores, f"{implementation} {cache_dtype} {query_dtype} {heads}")
    assert (out[:, 11:] == -1).all()


@pytest.mark.parametrize("implementation", IMPLS)
def test_normal_values_and_forced_blocks(rng, implementation):
    ispec = IndexerSpec(2, topk_blocks=5, init_blocks=1, local_blocks=2)
    prob = random_index_problem(ispec, [2, 2, 4], [900, 300, 1030], rng, decode_query_len=2,
                                values="normal")
    out, ref, scores = _run(prob, implementation)
    assert_topk_equal(out, ref, scores, implementation, tol=1e-3)
    assert (out[..., 0] == 0).all()  # the init block leads every row


@pytest.mark.parametrize("implementation", IMPLS)
def test_nan_in_a_seen_key_ranks_its_block_last(rng, implementation):
    ispec = IndexerSpec(1, topk_blocks=8, local_blocks=0)
    prob = random_index_problem(ispec, [2], [700], rng)
    page = prob.metadata.block_table[0, 2]
    prob.index_cache[page, 5] = np.nan  # seen by both tokens (positions 698, 699)
    out, ref, scores = _run(prob, implementation)
    assert np.isnan(scores[:, :, 2]).all() and (ref[..., 5] == 2).all()
    assert_topk_equal(out, ref, scores, implementation)


@pytest.mark.parametrize("implementation", IMPLS)
def test_padding_requests_and_short_rows(rng, implementation):
    # Rows with fewer visible blocks than topk (-1 after them); two empty padding requests.
    ispec = IndexerSpec(4, topk_blocks=6)
    prob = random_index_problem(ispec, [1, 3], [200, 3], rng, num_tokens=6, num_reqs=4)
    out, ref, scores = _run(prob, implementation)
    assert_topk_equal(out, ref, scores, implementation)
    assert (out[:, 0, 2:] == -1).all() and (out[:, 1:4, 1:] == -1).all()
    assert (out[:, 4:] == -1).all()


@pytest.mark.parametrize("implementation", IMPLS)
def test_ties_across_blocks_and_splits(rng, implementation):
    """Block scores in {0, 1, 2} (mostly 2): rows of 40-50 visible blocks where far more
    blocks tie than the top-k holds; the smaller blocks must win every tie, also when a decode
    row's blocks are split over programs and their candidate lists merged."""
    # topk 8 fills the kernels' candidate lists exactly and no forced local block comes last:
    # neither a spare slot nor a late eviction can hide a wrong tie break.
    ispec = IndexerSpec(2, topk_blocks=8, init_blocks=1, local_blocks=0)
    prob = random_index_problem(ispec, [1, 1, 3], [5000, 6300, 5100], rng)
    prob.index_query[...] = 0
    prob.index_query[..., 0] = 1
    live = ~np.isnan(prob.index_cache.astype(np.float32))
    values = rng.choice([0, 1, 2], prob.index_cache.shape[:2], p=[0.1, 0.1, 0.8])
    prob.index_cache[..., 0] = np.where(live[..., 0], values, np.nan)
    out, ref, scores = _run(prob, implementation)
    assert (np.sum(scores[..., 1:-1] == 2, axis=-1) > 10).all()  # many ties per row
    assert_topk_equal(out, ref, scores, f"{implementation} ties")
    if implementation == "pallas":  # 1 and 3 splits: 13-50 blocks per running top-k of 8
        md = interop.to_jax(prob.metadata)
        n = prob.metadata.num_tokens
        for splits in (1, 3):
            out = jax_sparse.indexer.index_topk_pallas(
                ispec, jnp.asarray(prob.index_query), jnp.asarray(prob.index_cache),
                md.token_positions[:n], md.block_table, md.query_start_loc, num_splits=splits)
            assert_topk_equal(np.asarray(out), ref, scores, f"pallas ties, {splits} splits")


@pytest.mark.parametrize("implementation", ["pallas"])
def test_split_ranges_keep_fewer_slots_than_the_topk(rng, implementation):
    """Decode block ranges shorter than the top-k keep fewer candidates per split."""
    ispec = IndexerSpec(4, topk_blocks=16)
    prob = random_index_problem(ispec, [1, 1], [5000, 4000], rng)
    max_blocks = prob.metadata.block_table.shape[1]
    tiles = interop.tiling.index_max_tiles(2, 2, interop.tiling.index_tile_tokens(4))
    splits = interop.tiling.index_num_splits(tiles, max_blocks)
    assert 1 < interop.tiling.index_split_slots(16, max_blocks, splits) < 16
    out, ref, scores = _run(prob, implementation)
    assert_topk_equal(out, ref, scores, f"{implementation}, {splits} splits")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, cache, query_lens, seq_lens", [
    (4, "auto", [1] * 6 + [1024, 3000], [32768, 20000, 4096, 129, 700, 9, 9000, 3000]),
    (1, "fp8_e4m3", [1] * 6 + [1024, 3000], [32768, 20000, 4096, 129, 700, 9, 9000, 3000]),
    (4, "auto", [1], [32768]),        # batch 1: 128 block ranges of 2, then the merge
])
def test_gpu_pallas_m3_shapes(rng, heads, cache, query_lens, seq_lens):
    """The compiled fused kernel at M3's shapes: decodes up to 32k tokens of context beside
    prefills of 1k and 3k tokens."""
    ispec = IndexerSpec(heads, index_cache_dtype=cache)
    prob = random_index_problem(ispec, query_lens, seq_lens, rng)
    out, ref, scores = _run(prob, "pallas")
    assert_topk_equal(out, ref, scores, f"gpu pallas heads {heads} {cache} {len(seq_lens)} reqs")


def test_under_jit_with_traced_metadata(rng):
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [1, 4], [600, 260], rng)
    ref, _ = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache,
                                          prob.metadata)
    step = jax.jit(lambda q, c, md: jax_sparse.index_topk(ispec, q, c, md,
                                                          implementation="xla"))
    out = step(jnp.asarray(prob.index_query), jnp.asarray(prob.index_cache),
               interop.to_jax(prob.metadata))
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_tile_plan_covers_each_request(rng):
    qsl = jnp.asarray([0, 1, 2, 40, 40, 45], jnp.int32)
    req, start = jax_sparse.indexer.plan_index_tiles(qsl, 8, 16)
    np.testing.assert_array_equal(np.asarray(req), [0, 1, 2, 2, 2, 4, 4, 4])
    np.testing.assert_array_equal(np.asarray(start), [0, 1, 2, 18, 34, 40, 45, 45])


# ---------------------------------------------------------------- write_index_k

@pytest.mark.parametrize("cache_dtype, query_dtype", CACHE_DTYPES + [("fp8_e5m2", "float16")])
def test_write_index_k(rng, cache_dtype, query_dtype):
    ispec = IndexerSpec(1, index_cache_dtype=cache_dtype)
    prob, key, slots = write_case(ispec, query_dtype, rng)
    cache = jax_sparse.write_index_k(jnp.asarray(prob.index_cache), jnp.asarray(key),
                                     jnp.asarray(slots), ispec)
    np.testing.assert_array_equal(np.asarray(cache).astype(np.float32),
                                  expected_after_write(prob.index_cache, key, slots))


def test_write_index_k_donates_and_checks_first(rng):
    ispec = IndexerSpec(1)
    cache = jnp.asarray(rng.standard_normal((3, 128, 128)), jnp.bfloat16)
    key = jnp.ones((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="slot_mapping\\[1\\] = 384 is past"):
        jax_sparse.write_index_k(cache, key, np.array([5, 384]), ispec)
    new = jax_sparse.write_index_k(cache, key, jnp.asarray([5, 200]), ispec)
    assert new[0, 5, 0] == 1 and new[1, 72, 0] == 1


@pytest.mark.parametrize("change, error, words", [
    (dict(key=np.ones((2, 128), np.float32)), TypeError, "index_key has dtype float32"),
    (dict(cache=np.ones((3, 128, 128), np.float16)), TypeError, "index_cache has dtype float16"),
    (dict(key=np.ones((2, 64), "bfloat16")), ValueError, "index_key shape"),
    (dict(cache=np.ones((3, 64, 128), "bfloat16")), ValueError, "index_cache shape"),
    (dict(slots=np.array([1])), ValueError, "slot_mapping has 1 entries"),
    (dict(slots=np.array([1.0, 2.0])), TypeError, "slot_mapping must hold integers"),
])
def test_write_index_k_rejects(change, error, words):
    import ml_dtypes
    args = dict(cache=np.ones((3, 128, 128), ml_dtypes.bfloat16),
                key=np.ones((2, 128), ml_dtypes.bfloat16), slots=np.array([0, 1]))
    args.update({k: (v.astype(ml_dtypes.bfloat16) if getattr(v, "dtype", None) == "bfloat16"
                     else v) for k, v in change.items()})
    with pytest.raises(error, match=words):
        jax_sparse.write_index_k(jnp.asarray(args["cache"]), jnp.asarray(args["key"]),
                                 args["slots"], IndexerSpec(1))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, error, words", [
    (dict(query_dtype=np.float32), TypeError, "index_query has dtype float32"),
    (dict(cache_dtype=np.float16), TypeError, "index_cache has dtype float16"),
    (dict(query_heads=3), ValueError, "index_query shape"),
    (dict(cache_shape=(4, 128, 64)), ValueError, "index_cache shape"),
    (dict(tokens=40), ValueError, "metadata.token_to_req has 5 entries"),
    (dict(implementation="mosaic"), ValueError, "not available for index_topk"),
])
def test_index_topk_rejects(rng, change, error, words):
    import ml_dtypes
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [1, 4], [300, 130], rng)
    q = prob.index_query
    if "query_dtype" in change:
        q = q.astype(change["query_dtype"])
    if "query_heads" in change:
        q = np.ones((q.shape[0], change["query_heads"], 128), ml_dtypes.bfloat16)
    if "tokens" in change:
        q = np.ones((change["tokens"], 2, 128), ml_dtypes.bfloat16)
    cache = prob.index_cache
    if "cache_dtype" in change:
        cache = cache.astype(change["cache_dtype"])
    if "cache_shape" in change:
        cache = np.ones(change["cache_shape"], ml_dtypes.bfloat16)
    with pytest.raises(error, match=words):
        jax_sparse.index_topk(ispec, jnp.asarray(q), jnp.asarray(cache),
                              interop.to_jax(prob.metadata),
                              implementation=change.get("implementation", "xla"))


@pytest.mark.parametrize("heads, cache", [(1, "fp8_e4m3"), (3, "auto")])
def test_pallas_scorer_lowers_for_cuda(heads, cache):
    """The fused scoring + top-k kernel lowers through Pallas' Triton backend for CUDA (no GPU needed; an
    H200 ran the bf16 and FP8 kernels)."""
    ispec = IndexerSpec(heads, index_cache_dtype=cache)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    args = (sds((40, heads, 128), jnp.bfloat16),
            sds(ispec.index_cache_shape(30), ispec.cache_storage_dtype("bfloat16")),
            sds((40,), i32), sds((3, 20), i32), sds((4,), i32))

    def call(*a):
        return jax_sparse.indexer.index_topk_pallas(ispec, *a, interpret=False)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower(), "no Triton kernel in the CUDA lowering"


def test_tpu_garbage_table_entries_never_read(rng):
    """Block-table entries past each request's visible blocks hold junk (negative, past the
    cache): the TPU interpreter raises on any out-of-bounds DMA; a decode, a speculative
    decode and a prefill in one batch, several tiles per request."""
    from jax.experimental.pallas import tpu as pltpu
    from jax_sparse.indexer import plan_index_tiles
    from jax_sparse.indexer_tpu import index_scores_tpu
    ispec = IndexerSpec(2, topk_blocks=3, init_blocks=1)
    prob = random_index_problem(ispec, [1, 2, 40], [900, 300, 400], rng, decode_query_len=2,
                                max_blocks=12)
    md = prob.metadata
    table = md.block_table
    num_blocks = prob.index_cache.shape[0]
    for r, seq_len in enumerate(md.seq_lens):
        used = -(-int(seq_len) // ispec.block_size)
        table[r, used:] = rng.choice([-7, num_blocks, 10**6], table.shape[1] - used)
    ref, scores = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache, md)
    n, tile_tokens = md.num_tokens, 8
    qsl = jnp.asarray(md.query_start_loc, jnp.int32)
    tiles = plan_index_tiles(qsl, 9, tile_tokens)
    got = index_scores_tpu(jnp.asarray(prob.index_query), jnp.asarray(prob.index_cache),
                           jnp.asarray(md.token_positions[:n]), jnp.asarray(table), qsl, *tiles,
                           block_size=ispec.block_size, tile_tokens=tile_tokens,
                           pipeline_depth=3, interpret=pltpu.InterpretParams())
    visible = np.isfinite(scores)
    np.testing.assert_array_equal(np.asarray(got)[visible], scores[visible].astype(np.float32))
    out = jax_sparse.index_topk(ispec, jnp.asarray(prob.index_query),
                                jnp.asarray(prob.index_cache), interop.to_jax(md),
                                implementation="tpu")
    assert_topk_equal(np.asarray(out), ref, scores, "tpu, junk past the visible blocks")


@pytest.mark.parametrize("heads, cache, query_dtype", [(4, "auto", "bfloat16"),
                                                       (1, "fp8_e4m3", "bfloat16"),
                                                       (4, "auto", "float16")])
def test_tpu_scorer_lowers_for_tpu(heads, cache, query_dtype):
    """The TPU scoring kernel lowers through Mosaic TPU (no TPU needed; Mosaic's own passes
    run in the TPU compiler, which this does not reach)."""
    from jax_sparse.indexer import plan_index_tiles
    from jax_sparse.indexer_tpu import index_scores_tpu
    ispec = IndexerSpec(heads, index_cache_dtype=cache)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    args = (sds((40, heads, 128), query_dtype),
            sds(ispec.index_cache_shape(30), ispec.cache_storage_dtype(query_dtype)),
            sds((40,), i32), sds((3, 20), i32), sds((4,), i32))
    tile_tokens = 64 // heads

    def call(q, cache, positions, table, qsl):
        tiles = plan_index_tiles(qsl, 8, tile_tokens)
        return index_scores_tpu(q, cache, positions, table, qsl, *tiles, block_size=128,
                                tile_tokens=tile_tokens, interpret=False)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the TPU lowering"


def test_select_topk_ties_and_forced_blocks():
    """Equal scores everywhere: forced init, forced local, then the smaller blocks."""
    ispec = IndexerSpec(1, topk_blocks=6, init_blocks=1, local_blocks=2)
    scores = jnp.ones((1, 2, 40), jnp.float32).at[0, 1, 7].set(jnp.nan)
    out = jax_sparse.indexer.select_topk(ispec, scores, jnp.asarray([40, 9], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), [[[0, 38, 39, 1, 2, 3], [0, 7, 8, 1, 2, 3]]])


@pytest.mark.parametrize("backend, expected", [("tpu", "tpu"), ("gpu", "pallas"),
                                               ("cpu", "xla")])
def test_default_index_implementation_per_platform(monkeypatch, backend, expected):
    monkeypatch.setattr(jax_sparse.indexer.jax, "default_backend", lambda: backend)
    assert jax_sparse.indexer.default_index_implementation() == expected, backend
