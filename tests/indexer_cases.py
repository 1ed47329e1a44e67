"""Inputs and checks the indexer tests of every front end share (NumPy only)."""
from __future__ import annotations

import dataclasses

import numpy as np

import interop
from interop.indexer import IndexerSpec
from interop.testing import NUMPY_DTYPES, random_block_table


@dataclasses.dataclass
class IndexProblem:
    ispec: IndexerSpec
    index_query: np.ndarray   # [num_tokens, num_index_heads, index_head_size], query dtype
    index_key: np.ndarray     # [num_tokens, index_head_size], query dtype (this step's keys)
    index_cache: np.ndarray   # (num_blocks, block_size, index_head_size), storage dtype
    metadata: interop.SparseMetadata


def random_index_problem(ispec: IndexerSpec, query_lens, seq_lens, rng: np.random.Generator, *,
                         decode_query_len: int = 1, query_dtype: str = "bfloat16",
                         values: str = "small_int", num_tokens: int | None = None,
                         num_reqs: int | None = None, max_blocks: int | None = None,
                         poison: bool = True) -> IndexProblem:
    """A random batch with a filled index cache.

    values: "small_int" draws every query and key entry from {-2, ..., 2} (never all zero):
      every dot product is an exact small integer in any precision, so every path must match
      the float64 reference bit for bit, and equal block scores (the tie rule) are common;
      "normal" draws standard normals.
    poison: slots no token may see (past each request's end, spare pages) hold NaN.
    num_tokens / num_reqs / max_blocks: padding, as `interop.build_metadata` takes it.
    """
    table, num_blocks = random_block_table(seq_lens, rng, block_size=ispec.block_size,
                                           max_blocks=max_blocks)
    md = interop.build_metadata(query_lens, seq_lens, table, decode_query_len=decode_query_len,
                                block_size=ispec.block_size, num_blocks=num_blocks,
                                num_tokens=num_tokens, num_reqs=num_reqs)
    n, heads, dim = md.num_tokens, ispec.num_index_heads, ispec.index_head_size

    def draw(shape):
        if values == "small_int":
            return rng.integers(-2, 3, shape).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    cache = draw(ispec.index_cache_shape(num_blocks))
    if poison:
        used = np.zeros(cache.shape[:2], bool)
        for r, seq_len in enumerate(md.seq_lens):
            pos = np.arange(int(seq_len))
            used[md.block_table[r, pos // ispec.block_size], pos % ispec.block_size] = True
        cache[~used] = np.nan
    storage = NUMPY_DTYPES[ispec.cache_storage_dtype(query_dtype)]
    qdt = NUMPY_DTYPES[query_dtype]
    return IndexProblem(ispec=ispec, index_query=draw((n, heads, dim)).astype(qdt),
                        index_key=draw((n, dim)).astype(qdt), index_cache=cache.astype(storage),
                        metadata=md)


def assert_topk_equal(got, ref_topk, ref_scores, case: str, *, tol: float = 0.0) -> None:
    """got [H, >= T, K] against the reference selection [H, T, K]. tol == 0: exactly equal.
    tol > 0 (scores computed in lower precision than float64): wherever the rows differ, the
    two blocks' reference scores must lie within tol of each other (a near-tie either way)."""
    got = np.asarray(got).astype(np.int64)[:, :ref_topk.shape[1]]
    assert got.shape == ref_topk.shape, (case, got.shape, ref_topk.shape)
    diff = got != ref_topk
    if not diff.any():
        return
    h, t, k = np.nonzero(diff)
    if tol > 0 and (got[diff] >= 0).all() and (ref_topk[diff] >= 0).all():
        a = ref_scores[h, t, got[diff]]
        b = ref_scores[h, t, ref_topk[diff]]
        gap = np.abs(np.where(np.isnan(a) & np.isnan(b), 0.0, a - b))
        if (gap <= tol).all():
            return
    h, t = h[0], t[0]
    expected = ref_topk[h, t]
    raise AssertionError(
        f"{case}: {diff.any(-1).sum()} rows differ; first at head {h}, token {t}: "
        f"got {got[h, t].tolist()}, expected {expected.tolist()} (scores of the expected row "
        f"{np.round(ref_scores[h, t, np.maximum(expected, 0)], 4).tolist()})")


def write_case(ispec: IndexerSpec, query_dtype: str, rng: np.random.Generator):
    """(problem, keys, slots) for a write_index_k test: the first key holds values past the FP8
    range (they saturate), the last token is padding (slot -1), token 1's slot lies past the
    cache (never written)."""
    prob = random_index_problem(ispec, [3, 2], [300, 2], rng, query_dtype=query_dtype,
                                values="normal", num_tokens=6)
    key = prob.index_key.astype(np.float32)
    key[0, :4] = [6e4, -6e4, 3.0, -2.5]
    slots = prob.metadata.slot_mapping.copy()
    slots[1] = prob.index_cache.shape[0] * ispec.block_size
    return prob, key.astype(prob.index_key.dtype), slots


def expected_after_write(cache: np.ndarray, key: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """float32 cache after writing key [T, D] at slots [T] (negative or past the cache:
    skipped), FP8 values saturated to the format's largest finite value."""
    expected = cache.astype(np.float32)
    fmax = interop.FP8_MAX.get(str(cache.dtype), np.inf)
    stored = np.clip(key.astype(np.float32), -fmax, fmax).astype(cache.dtype)
    live = (slots >= 0) & (slots < cache.shape[0] * cache.shape[1])
    expected[slots[live] // cache.shape[1], slots[live] % cache.shape[1]] = \
        stored[live].astype(np.float32)
    return expected
