"""The indexer's framework-neutral core: IndexerSpec validation, the float64 reference against
an independent brute-force loop, the selection rule (ties, forced blocks, NaN, padding) and the
kernels' priority key against the rule."""
import ml_dtypes
import numpy as np
import pytest

import interop
from interop import tiling
from interop.indexer import IndexerSpec, priority_keys, select_blocks

from .indexer_cases import random_index_problem

BS = 128


# ---------------------------------------------------------------- spec

def test_spec_defaults_and_shapes():
    ispec = IndexerSpec(4)
    assert (ispec.index_head_size, ispec.topk_blocks, ispec.block_size, ispec.init_blocks,
            ispec.local_blocks, ispec.index_cache_dtype) == (128, 16, 128, 0, 1, "auto")
    assert ispec.index_cache_shape(7) == (7, 128, 128)
    assert ispec.check_index_cache_shape((7, 128, 128)) == 7
    assert ispec.check_index_query_shape((5, 4, 128)) == 5
    assert ispec.check_index_key_shape((5, 128)) == 5
    assert ispec.topk_shape(5) == (4, 5, 16)
    assert ispec.cache_storage_dtype("float16") == "float16"
    fp8 = IndexerSpec(1, index_cache_dtype="fp8")
    assert fp8.is_fp8 and fp8.cache_storage_dtype("bfloat16") == "float8_e4m3fn"
    assert hash(ispec) == hash(IndexerSpec(4)) and ispec == IndexerSpec(4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_index_heads=0), ["num_index_heads", "0"]),
    (dict(num_index_heads=4, topk_blocks=0), ["topk_blocks", "0"]),
    (dict(num_index_heads=4, init_blocks=-1), ["init_blocks", "-1"]),
    (dict(num_index_heads=4, local_blocks=1.5), ["local_blocks", "1.5"]),
    (dict(num_index_heads=4, index_head_size=64), ["index_head_size", "64", "128"]),
    (dict(num_index_heads=4, block_size=64), ["block_size", "64", "128"]),
    (dict(num_index_heads=4, index_cache_dtype="int8"), ["index_cache_dtype", "int8", "fp8_e5m2"]),
])
def test_spec_rejects(kwargs, words):
    with pytest.raises(ValueError) as err:
        IndexerSpec(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("shape, method", [
    ((7, 128, 64), "check_index_cache_shape"), ((7, 2, 128, 128), "check_index_cache_shape"),
    ((5, 2, 128), "check_index_query_shape"), ((5, 4, 128), "check_index_key_shape")])
def test_spec_rejects_shapes(shape, method):
    with pytest.raises(ValueError, match="does not match the spec"):
        getattr(IndexerSpec(4), method)(shape)


# ---------------------------------------------------------------- reference vs brute force

def brute_force(ispec, q, cache, md):
    """Per (head, token) row, per block, per key: the contract's words in Python loops."""
    q = q.astype(np.float64)
    cache = cache.astype(np.float64)
    heads, k = ispec.num_index_heads, ispec.topk_blocks
    num_tokens = q.shape[0]
    topk = np.full((heads, num_tokens, k), -1, np.int64)
    for t in range(num_tokens):
        p = int(md.token_positions[t])
        if p < 0:
            continue
        nvis = p // BS + 1
        page_of = md.block_table[md.token_to_req[t]]
        for h in range(heads):
            score = {}
            for b in range(nvis):
                dots = [q[t, h] @ cache[page_of[b], j] for j in range(BS) if b * BS + j <= p]
                score[b] = np.nan if np.isnan(dots).any() else max(dots)

            def priority(b):
                if b < ispec.init_blocks:
                    return (0, 0.0, b)
                if b >= nvis - ispec.local_blocks:
                    return (1, 0.0, b)
                if np.isnan(score[b]):
                    return (3, 0.0, b)
                return (2, -score[b], b)
            chosen = sorted(range(nvis), key=priority)[:k]
            topk[h, t, :len(chosen)] = chosen
    return topk


@pytest.mark.parametrize("heads, init, local, topk", [(4, 0, 1, 4), (1, 1, 2, 3), (2, 2, 0, 8)])
@pytest.mark.parametrize("values", ["small_int", "normal"])
def test_reference_matches_brute_force(rng, heads, init, local, topk, values):
    ispec = IndexerSpec(heads, topk_blocks=topk, init_blocks=init, local_blocks=local)
    # Two decodes, then prefills that start mid-block and cross block boundaries.
    prob = random_index_problem(ispec, [1, 1, 5, 3], [900, 129, 260, 700], rng, values=values,
                                num_tokens=12)
    got, scores = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache,
                                               prob.metadata)
    assert got.dtype == np.int32 and got.shape == (heads, 12, topk)
    width = prob.metadata.block_table.shape[1]
    assert scores.dtype == np.float64 and scores.shape == (heads, 12, width)
    np.testing.assert_array_equal(got, brute_force(ispec, prob.index_query, prob.index_cache,
                                                   prob.metadata))
    # Padding tokens: all -1, every score -inf; poisoned (NaN) slots no token sees never show.
    assert (got[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()
    assert not np.isnan(scores).any()


def test_reference_scores_are_block_maxima(rng):
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [3], [300], rng, values="normal")
    _, scores = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache,
                                             prob.metadata)
    md = prob.metadata
    page0, page2 = md.block_table[0, 0], md.block_table[0, 2]
    q = prob.index_query.astype(np.float64)
    keys = prob.index_cache.astype(np.float64)
    for t, p in enumerate(md.token_positions):  # positions 297, 298, 299
        np.testing.assert_allclose(scores[:, t, 0], (q[t] @ keys[page0].T).max(-1))
        np.testing.assert_allclose(scores[:, t, 2], (q[t] @ keys[page2, :p - 255].T).max(-1))
        assert np.isneginf(scores[:, t, 3:]).all()


# ---------------------------------------------------------------- the selection rule

def test_ties_go_to_the_smaller_block():
    ispec = IndexerSpec(1, topk_blocks=4, local_blocks=0)
    scores = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 3.0, -0.0, 0.0]])
    np.testing.assert_array_equal(select_blocks(ispec, scores, np.array([8])), [[1, 3, 5, 2]])
    zeros = np.array([[-0.0, 0.0, -0.0, -1.0]])  # both zeros tie
    np.testing.assert_array_equal(select_blocks(ispec, zeros, np.array([4])), [[0, 1, 2, 3]])
    narrow = np.array([[2.0, 5.0]])  # a block table narrower than the row
    np.testing.assert_array_equal(select_blocks(ispec, narrow, np.array([2])), [[1, 0, -1, -1]])


def test_forced_blocks_rank_first_init_before_local():
    scores = np.array([[9.0, 1.0, 8.0, 7.0, 0.5, 0.25, 6.0, 5.0]])
    ispec = IndexerSpec(1, topk_blocks=6, init_blocks=2, local_blocks=2)
    # init 0, 1; local 5, 6 (nvis 7: block 7 is not visible); then 2, 3, 4 by score.
    np.testing.assert_array_equal(select_blocks(ispec, scores, np.array([7])),
                                  [[0, 1, 5, 6, 2, 3]])
    # More forced blocks than the row holds: init first.
    small = IndexerSpec(1, topk_blocks=3, init_blocks=2, local_blocks=2)
    np.testing.assert_array_equal(select_blocks(small, scores, np.array([8])), [[0, 1, 6]])
    # Init and local overlap in a short row; nvis < topk pads with -1.
    np.testing.assert_array_equal(select_blocks(ispec, scores, np.array([3])),
                                  [[0, 1, 2, -1, -1, -1]])


def test_nan_ranks_lowest_and_inf_orders():
    ispec = IndexerSpec(1, topk_blocks=6, local_blocks=0)
    scores = np.array([[np.nan, -np.inf, 2.0, np.inf, np.nan, -3.0]])
    np.testing.assert_array_equal(select_blocks(ispec, scores, np.array([6])),
                                  [[3, 2, 5, 1, 0, 4]])


def test_priority_keys_order_the_rows_like_the_rule(rng):
    ispec = IndexerSpec(1, topk_blocks=24, init_blocks=1, local_blocks=2)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3.4e38])
    scores = rng.choice(np.concatenate([specials, rng.standard_normal(6)]), (200, 30))
    scores = scores.astype(np.float32).astype(np.float64)
    nvis = rng.integers(0, 31, 200)
    keys = priority_keys(ispec, scores, nvis).astype(np.int64)
    assert keys.dtype == np.int64 and (keys[np.arange(30)[None] >= nvis[:, None]]
                                       == interop.indexer.PRIORITY_HIDDEN).all()
    order = np.lexsort((np.broadcast_to(np.arange(30), keys.shape), -keys), axis=-1)[:, :24]
    expected = select_blocks(ispec, scores, nvis)
    np.testing.assert_array_equal(np.where(expected >= 0, order, -1), expected)


def test_reference_fp8_cache_and_bf16_query(rng):
    ispec = IndexerSpec(2, topk_blocks=4, index_cache_dtype="fp8_e4m3")
    prob = random_index_problem(ispec, [4], [520], rng, values="normal")
    assert prob.index_cache.dtype == ml_dtypes.float8_e4m3fn
    got, scores = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache,
                                               prob.metadata)
    np.testing.assert_array_equal(got, brute_force(ispec, prob.index_query, prob.index_cache,
                                                   prob.metadata))


def test_reference_rejects_bad_metadata(rng):
    ispec = IndexerSpec(1, topk_blocks=2)
    prob = random_index_problem(ispec, [2], [300], rng)
    md = prob.metadata
    narrow = md.replace(block_table=md.block_table[:, :2])
    with pytest.raises(ValueError, match="sees 3 blocks"):
        interop.reference_index_topk(ispec, prob.index_query, prob.index_cache, narrow)
    outside = md.replace(block_table=np.where(np.arange(md.block_table.shape[1]) == 1, 10**6,
                                              md.block_table))
    with pytest.raises(ValueError, match="outside the index cache"):
        interop.reference_index_topk(ispec, prob.index_query, prob.index_cache, outside)
    with pytest.raises(ValueError, match="index_query shape"):
        interop.reference_index_topk(ispec, prob.index_query[:, :, :64], prob.index_cache, md)


def test_index_tiling():
    assert tiling.index_tile_tokens(4) == 16 and tiling.index_tile_tokens(1) == 64
    assert tiling.index_tile_tokens(3) == 16 and tiling.index_tile_tokens(4, 1) == 1
    assert tiling.index_tile_tokens(1, 3) == 4
    assert tiling.index_tile_rows(4, 1) == 16 and tiling.index_tile_rows(4, 16) == 64
    assert tiling.index_num_splits(1, 257) == 128 and tiling.index_num_splits(256, 256) == 1
    assert tiling.index_num_splits(1, 8) == 4 and tiling.index_num_splits(1, 3) == 1
    assert tiling.index_split_slots(16, 257, 128) == 4 and tiling.index_split_slots(16, 9, 1) == 16
    assert tiling.index_split_slots(16, 41, 8) == 8 and tiling.index_split_slots(4, 41, 8) == 4
    assert tiling.index_num_splits(16, 256) == 16
    assert tiling.index_max_tiles(100, 3, 16) == 10
