"""Inputs for tests and demos: paged batches and MiniMax-M3-like top-k selections.

Everything here is NumPy (the query and cache use ml_dtypes' bfloat16 / float16 / float8
types), so either front end can take it through `interop.to_torch` / `interop.to_jax`.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from .metadata import SparseMetadata, build_metadata
from .spec import SparseAttentionSpec

NUMPY_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def matching_query_dtype(cache_dtype: str) -> str:
    """The query dtype tests pair with a cache dtype (a spec name or a storage name): float16
    with a float16 cache, bfloat16 with every other."""
    return "float16" if cache_dtype == "float16" else "bfloat16"


def random_block_table(seq_lens, rng: np.random.Generator, *, block_size: int = 128,
                       spare_blocks: int = 3, max_blocks: int | None = None):
    """Distinct shuffled pages for every request; returns (block_table, num_blocks).

    Unused entries of a row hold -1; `spare_blocks` pages stay unused by any request. Rows are
    `max_blocks` wide (default: one more than the longest request needs); fix it to keep the
    table's shape across batches (a jitted caller then never recompiles).
    """
    seq_lens = np.asarray(seq_lens, np.int64)
    needed = -(-seq_lens // block_size)
    num_blocks = int(needed.sum()) + spare_blocks
    pages = rng.permutation(num_blocks)
    if max_blocks is None:
        max_blocks = int(needed.max(initial=0)) + 1
    table = np.full((len(seq_lens), max(max_blocks, 1)), -1, np.int32)
    start = 0
    for r, n in enumerate(needed):
        table[r, :n] = pages[start:start + n]
        start += n
    return table, num_blocks


def make_topk(metadata: SparseMetadata, num_kv_heads: int, topk: int, rng: np.random.Generator,
              *, block_size: int = 128, scatter: bool = False, future_fraction: float = 0.0,
              empty_fraction: float = 0.0, rho: float | None = None) -> np.ndarray:
    """An M3-like selection: [num_kv_heads, num_tokens, topk] int32.

    Each row holds the token's own block, then distinct older blocks, padded with -1.
    rho: None draws the older blocks uniformly at random (no overlap between neighbours: the
      worst case for tile unions). A float (0.87 reproduces the M3 indexer's overlap) makes
      the selection correlated: a token keeps each of its predecessor's (same request, same KV
      head) blocks other than its own with probability rho, and draws the rest at random
      among the visible blocks not already in the row.
    scatter: shuffle every row, so sentinels stand anywhere, not only at the end.
    future_fraction: the share of -1 padding replaced by blocks the token may not see.
    empty_fraction: the share of rows left with no valid entry at all.
    """
    positions = np.asarray(metadata.token_positions, np.int64)
    num_tokens = positions.shape[0]
    own = np.where(positions >= 0, positions // block_size, -1)
    if rho is None:
        out = _random_topk(own, num_kv_heads, topk, rng)
    else:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho {rho!r} must lie in [0, 1]")
        out = _correlated_topk(own, np.asarray(metadata.token_to_req, np.int64), num_kv_heads,
                               topk, rho, rng)
    if future_fraction:
        pad = out == -1
        future = pad & (rng.random(out.shape) < future_fraction)
        limit = np.where(positions >= 0, positions // block_size + 1, 0)
        out[future] = (limit[None, :, None] + rng.integers(0, 3, out.shape))[future]
    if empty_fraction:
        empty = rng.random(out.shape[:2]) < empty_fraction
        out[empty] = -1
    if scatter:
        for g in range(num_kv_heads):
            for t in range(num_tokens):
                out[g, t] = rng.permutation(out[g, t])
    return out


def _random_topk(own: np.ndarray, num_kv_heads: int, topk: int, rng: np.random.Generator):
    """Own block first, then distinct older blocks in random order (-1 past the visible)."""
    num_tokens = own.shape[0]
    out = np.full((num_kv_heads, num_tokens, topk), -1, np.int32)
    width = int(own.max(initial=0)) + 1
    chunk = max(1, (1 << 22) // width)
    for g in range(num_kv_heads):
        for t0 in range(0, num_tokens, chunk):
            o = own[t0:t0 + chunk, None]
            # Older blocks in random order: random keys, future and own blocks pushed last.
            keys = rng.random((o.shape[0], width))
            keys[np.arange(width)[None, :] >= o] = np.inf
            older = np.argsort(keys, axis=1)[:, :topk - 1]
            older = np.where(older < o, older, -1)
            out[g, t0:t0 + chunk, 0] = o[:, 0]
            out[g, t0:t0 + chunk, 1:1 + older.shape[1]] = older
    return out


def _correlated_topk(own: np.ndarray, token_to_req: np.ndarray, num_kv_heads: int, topk: int,
                     rho: float, rng: np.random.Generator):
    """Rows that keep each predecessor block with probability rho (see `make_topk`)."""
    num_tokens = own.shape[0]
    out = np.full((num_kv_heads, num_tokens, topk), -1, np.int32)
    prev = np.full((num_kv_heads, topk), -1, np.int64)
    for t in range(num_tokens):
        o = int(own[t])
        if o < 0:
            continue
        if t == 0 or own[t - 1] < 0 or token_to_req[t - 1] != token_to_req[t]:
            prev[:] = -1  # a request's first token has no predecessor
        keep = (prev >= 0) & (prev != o) & (rng.random(prev.shape) < rho)
        # Older blocks still free, in random order; the kept ones are pushed last.
        keys = rng.random((num_kv_heads, o))
        if o:
            heads, kept = np.nonzero(keep)
            keys[heads, prev[heads, kept]] = np.inf
        fresh = np.argsort(keys, axis=1)
        row = np.full((num_kv_heads, topk), -1, np.int64)
        row[:, 0] = o
        for g in range(num_kv_heads):
            kept = prev[g, keep[g]][:topk - 1]
            n_new = min(topk - 1 - kept.size, o - kept.size)
            row[g, 1:1 + kept.size] = kept
            row[g, 1 + kept.size:1 + kept.size + n_new] = fresh[g, :n_new]
        out[:, t] = row
        prev = row
    return out


def mean_tile_union(topk_indices: np.ndarray, metadata: SparseMetadata, *, tile: int = 8,
                    block_size: int = 128) -> float:
    """Mean number of distinct valid (request, block) entries over tiles of `tile` consecutive
    tokens, per KV head: the blocks a token-tile union kernel loads per tile."""
    from .metadata import valid_topk_mask
    positions = np.asarray(metadata.token_positions, np.int64)
    n = int(np.count_nonzero(positions >= 0))
    if n == 0:
        return 0.0
    topk = np.asarray(topk_indices, np.int64)[:, :n]
    valid = valid_topk_mask(topk, positions[:n], block_size)
    req = np.asarray(metadata.token_to_req, np.int64)[:n]
    width = int(topk.max(initial=0)) + 1
    keys = np.where(valid, req[None, :, None] * width + topk, -1)
    num_tiles = -(-n // tile)
    keys = np.pad(keys, ((0, 0), (0, num_tiles * tile - n), (0, 0)), constant_values=-1)
    keys = np.sort(keys.reshape(keys.shape[0], num_tiles, -1), axis=-1)
    distinct = (keys >= 0) & np.concatenate(
        [np.ones_like(keys[..., :1], bool), keys[..., 1:] != keys[..., :-1]], axis=-1)
    return float(distinct.sum(-1).mean())


@dataclasses.dataclass
class Problem:
    """One random batch: NumPy inputs of every operation, in the spec's physical layout."""

    spec: SparseAttentionSpec
    query: np.ndarray         # [num_tokens, num_heads, head_size], query dtype
    key: np.ndarray           # [num_tokens, num_kv_heads, head_size], query dtype (new K)
    value: np.ndarray         # [num_tokens, num_kv_heads, head_size], query dtype (new V)
    kv_cache: np.ndarray      # physical cache, storage dtype, holding the context (and new K/V)
    topk_indices: np.ndarray  # [num_kv_heads, num_tokens, topk] int32
    metadata: SparseMetadata
    k_scale: object           # None, a float or [num_kv_heads, num_blocks * block_size] float32
    v_scale: object


def random_problem(spec: SparseAttentionSpec, query_lens, seq_lens, rng: np.random.Generator,
                   *, decode_query_len: int = 1, query_dtype: str = "bfloat16",
                   scale_mode: str = "none", num_tokens: int | None = None,
                   max_blocks: int | None = None, scatter: bool = False,
                   future_fraction: float = 0.0, empty_fraction: float = 0.0,
                   rho: float | None = None) -> Problem:
    """A random batch with a filled cache (every slot of every page random, never zeros).

    scale_mode: "none", "scalar" or "per_slot" (FP8 caches; other caches ignore scales).
    num_tokens / max_blocks: pad the token rows / block-table rows to a fixed size.
    scatter / future_fraction / empty_fraction / rho: the selection, as `make_topk` makes it.
    """
    table, num_blocks = random_block_table(seq_lens, rng, block_size=spec.block_size,
                                           max_blocks=max_blocks)
    md = build_metadata(query_lens, seq_lens, table, decode_query_len=decode_query_len,
                        block_size=spec.block_size, num_blocks=num_blocks,
                        num_tokens=num_tokens)
    n = md.num_tokens
    qdt = NUMPY_DTYPES[query_dtype]
    cdt = NUMPY_DTYPES[spec.cache_storage_dtype(query_dtype)]
    shape = spec.physical_kv_cache_shape(num_blocks)
    cache = rng.standard_normal(shape, dtype=np.float32)  # float32 draws: half the host time
    if scale_mode == "none":
        k_scale = v_scale = None
    elif scale_mode == "scalar":
        k_scale, v_scale = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0))
    elif scale_mode == "per_slot":
        slots = (spec.num_kv_heads, num_blocks * spec.block_size)
        k_scale = rng.uniform(0.5, 2.0, slots).astype(np.float32)
        v_scale = rng.uniform(0.5, 2.0, slots).astype(np.float32)
    else:
        raise ValueError(f"scale_mode {scale_mode!r} is unknown; expected 'none', 'scalar' "
                         "or 'per_slot'")
    return Problem(
        spec=spec,
        query=rng.standard_normal((n, spec.num_heads, spec.head_size)).astype(qdt),
        key=rng.standard_normal((n, spec.num_kv_heads, spec.head_size)).astype(qdt),
        value=rng.standard_normal((n, spec.num_kv_heads, spec.head_size)).astype(qdt),
        kv_cache=cache.astype(cdt),
        topk_indices=make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng,
                               block_size=spec.block_size, scatter=scatter,
                               future_fraction=future_fraction, empty_fraction=empty_fraction,
                               rho=rho),
        metadata=md,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def poison_unused_slots(problem: Problem) -> None:
    """Fill every cache slot no token of the batch may attend (past each request's end, spare
    pages) with NaN, in place: a kernel that reads one, even masked out after the fact, shows
    NaN in its output."""
    md, spec = problem.metadata, problem.spec
    cache = problem.kv_cache.astype(np.float32)
    used = np.zeros((cache.shape[0], spec.block_size), bool)
    for r, seq_len in enumerate(np.asarray(md.seq_lens)):
        pos = np.arange(int(seq_len))
        used[md.block_table[r, pos // spec.block_size], pos % spec.block_size] = True
    axes = (0, 2) if spec.kv_cache_layout == "NHD" else (0, 3)  # (page, slot) axes
    cache = np.moveaxis(cache, axes, (0, 1))
    cache[~used] = np.nan
    problem.kv_cache = np.moveaxis(cache, (0, 1), axes).astype(problem.kv_cache.dtype)


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere in `out` gives inf)."""
    from .arrays import to_float64
    out = to_float64(out)
    ref = to_float64(ref)
    if not np.isfinite(out).all():
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))
