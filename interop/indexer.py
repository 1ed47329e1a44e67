"""The lightning indexer's static facts and its float64 reference (contract, section 6).

MiniMax-M3's indexer as vLLM 0.33 runs it (score type "max", no index values, one index key per
token shared by every index head): each index head scores every block a token may see by the
largest dot product of its index query with the block's visible index keys, and keeps the
`topk_blocks` best, the forced init / local blocks first. The result is the `topk_indices` that
sparse attention takes.

This module is the single home of the indexer's shapes and of the priority order, including the
32-bit priority key the kernels of both front ends sort by (`priority_keys`); the reference
ranks by the contract's words instead (`select_blocks`), so the two check each other.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .arrays import to_float64, to_numpy
from .spec import CACHE_DTYPES, FP8_DTYPES, QUERY_DTYPES, SUPPORTED_BLOCK_SIZES, \
    SUPPORTED_HEAD_SIZES, _choices

# The priority key the kernels of both front ends sort by: a signed 32-bit value per visible
# block, larger = selected first, equal keys to the smaller block id. A float score with IEEE
# bits `bits` (read as int32) and magnitude bits mag = bits & 0x7FFFFFFF maps monotonically to
#   key = mag if bits >= 0 or mag == 0 else -1 - mag        (both zeros tie at 0),
# so -inf -> -1 - 0x7F800000 and +inf -> 0x7F800000; a NaN score takes PRIORITY_NAN (below
# -inf), forced blocks PRIORITY_LOCAL / PRIORITY_INIT (above +inf; init wins when a block is
# both). Blocks a token may not see take PRIORITY_HIDDEN where a value is needed.
PRIORITY_INIT = 2**31 - 1
PRIORITY_LOCAL = 2**31 - 2
PRIORITY_NAN = -(2**31) + 1
PRIORITY_HIDDEN = -(2**31)
MAGNITUDE_MASK = 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class IndexerSpec:
    """Static facts of a MiniMax-M3 lightning indexer (hashable: a valid `jax.jit` static).

    Args:
      num_index_heads: index query heads (M3: 4, = KV heads; 1 at tensor parallel 4); the
        output's rows are [num_index_heads, num_tokens] and feed sparse attention as its
        [num_kv_heads, num_tokens] top-k.
      index_head_size: index query / key dimension (supported: 128).
      topk_blocks: blocks kept per (index head, token) row.
      block_size: tokens per page == tokens per sparse block (supported: 128).
      init_blocks: the first `init_blocks` blocks are always kept (M3: 0).
      local_blocks: the last `local_blocks` visible blocks are always kept (M3: 1, the
        token's own block).
      index_cache_dtype: one of CACHE_DTYPES ("auto" means the index query dtype); FP8 caches
        hold the keys saturated to the format's range, with no scale (a positive scale would
        not change the order).
    """

    num_index_heads: int
    index_head_size: int = 128
    topk_blocks: int = 16
    block_size: int = 128
    init_blocks: int = 0
    local_blocks: int = 1
    index_cache_dtype: str = "auto"

    def __post_init__(self):
        for name, low in (("num_index_heads", 1), ("topk_blocks", 1), ("init_blocks", 0),
                          ("local_blocks", 0)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                kind = "a positive int" if low else "an int >= 0"
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if self.index_head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"index_head_size {self.index_head_size!r} is not supported; "
                             f"expected one of {_choices(SUPPORTED_HEAD_SIZES)}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size {self.block_size!r} is not supported; expected one of "
                             f"{_choices(SUPPORTED_BLOCK_SIZES)}")
        if self.index_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"index_cache_dtype {self.index_cache_dtype!r} is unknown; "
                             f"expected one of {_choices(CACHE_DTYPES)}")

    @property
    def is_fp8(self) -> bool:
        return CACHE_DTYPES[self.index_cache_dtype] in FP8_DTYPES

    def cache_storage_dtype(self, query_dtype: str) -> str:
        """Name of the dtype the index cache holds for index queries of `query_dtype`."""
        if query_dtype not in QUERY_DTYPES:
            raise ValueError(f"index query dtype {query_dtype!r} is not supported; expected one "
                             f"of {_choices(QUERY_DTYPES)}")
        return CACHE_DTYPES[self.index_cache_dtype] or query_dtype

    def index_cache_shape(self, num_blocks: int) -> tuple[int, int, int]:
        """(num_blocks, block_size, index_head_size): one key per slot, on the KV cache's pages."""
        return (num_blocks, self.block_size, self.index_head_size)

    def check_index_cache_shape(self, shape) -> int:
        """Validate an index cache shape; returns num_blocks."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape != self.index_cache_shape(shape[0]):
            raise ValueError(f"index_cache shape {shape} does not match the spec: expected "
                             f"(num_blocks, {self.block_size}, {self.index_head_size})")
        return shape[0]

    def check_index_query_shape(self, shape) -> int:
        """Validate [num_tokens, num_index_heads, index_head_size]; returns num_tokens."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[1:] != (self.num_index_heads, self.index_head_size):
            raise ValueError(f"index_query shape {shape} does not match the spec: expected "
                             f"[num_tokens, {self.num_index_heads}, {self.index_head_size}]")
        return shape[0]

    def check_index_key_shape(self, shape) -> int:
        """Validate [num_tokens, index_head_size]; returns num_tokens."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[1] != self.index_head_size:
            raise ValueError(f"index_key shape {shape} does not match the spec: expected "
                             f"[num_tokens, {self.index_head_size}]")
        return shape[0]

    def topk_shape(self, num_tokens: int) -> tuple[int, int, int]:
        """The output's shape: [num_index_heads, num_tokens, topk_blocks] int32."""
        return (self.num_index_heads, num_tokens, self.topk_blocks)


def visible_blocks(token_positions, block_size: int) -> np.ndarray:
    """Blocks each token may see: position // block_size + 1, 0 for padding (position -1)."""
    pos = np.asarray(token_positions, np.int64)
    return np.where(pos >= 0, pos // block_size + 1, 0)


def select_blocks(ispec: IndexerSpec, scores: np.ndarray, nvis: np.ndarray) -> np.ndarray:
    """The contract's selection rule on float scores [..., width] (columns >= nvis [...] are
    not visible): int32 [..., topk_blocks], the highest-priority visible blocks first (forced
    init, then forced local, then descending score, NaN last; equal priority: smaller block
    first), -1 past min(topk_blocks, nvis)."""
    width = scores.shape[-1]
    block = np.broadcast_to(np.arange(width), scores.shape)
    n = np.asarray(nvis)[..., None]
    # rank 0: init, 1: local, 2: scored, 3: NaN score, 4: not visible.
    rank = np.where(np.isnan(scores), 3, 2)
    rank = np.where(block >= n - ispec.local_blocks, 1, rank)
    rank = np.where(block < ispec.init_blocks, 0, rank)
    rank = np.where(block < n, rank, 4)
    by_score = np.where(rank == 2, -scores, 0.0)
    order = np.lexsort((block, by_score, rank), axis=-1)
    k = ispec.topk_blocks
    chosen = order[..., :k]
    kept = np.arange(min(k, width)) < n
    out = np.where(kept, chosen, -1)
    if width < k:
        out = np.concatenate([out, np.full(out.shape[:-1] + (k - width,), -1, out.dtype)], -1)
    return out.astype(np.int32)


def priority_keys(ispec: IndexerSpec, scores: np.ndarray, nvis: np.ndarray) -> np.ndarray:
    """The kernels' priority key (PRIORITY_* above) of float32 scores [..., width]: int32
    [..., width], PRIORITY_HIDDEN past nvis [...]. Sorting a row by (key descending, block
    ascending) gives `select_blocks`' order."""
    bits = np.asarray(scores, np.float32).view(np.int32).astype(np.int64)
    mag = bits & MAGNITUDE_MASK
    key = np.where((bits >= 0) | (mag == 0), mag, -1 - mag)
    key = np.where(np.isnan(scores), PRIORITY_NAN, key)
    block = np.arange(scores.shape[-1])
    n = np.asarray(nvis)[..., None]
    key = np.where(block >= n - ispec.local_blocks, PRIORITY_LOCAL, key)
    key = np.where(block < ispec.init_blocks, PRIORITY_INIT, key)
    return np.where(block < n, key, PRIORITY_HIDDEN).astype(np.int32)


def reference_index_topk(ispec: IndexerSpec, index_query, index_cache, metadata, *,
                         chunk_elements: int = 1 << 24):
    """The indexer in float64, straight from the contract (section 6).

    Args:
      index_query: [num_tokens, num_index_heads, index_head_size] (any flavour).
      index_cache: (num_blocks, block_size, index_head_size) (any flavour; FP8 read as stored).
      metadata: any flavour; its token_positions, token_to_req and block_table are read.
      chunk_elements: dot products computed at once (host memory bound).
    Returns: (topk, scores): int32 [num_index_heads, num_tokens, topk_blocks], the selection;
      float64 [num_index_heads, num_tokens, max_blocks], the score of every visible block
      (max over its keys j <= position of q . k, no scale; NaN when a visible key's dot is
      NaN) and -inf where the block is not visible. Padding tokens (position -1) get all -1
      and all -inf.
    Raises ValueError when a token sees more blocks than its block-table row holds or a visible
      block's page lies outside the cache (metadata the kernels cannot answer for).
    """
    q = to_float64(index_query)
    num_tokens = ispec.check_index_query_shape(q.shape)
    cache = to_float64(index_cache)
    num_blocks = ispec.check_index_cache_shape(cache.shape)
    bs = ispec.block_size
    positions = to_numpy(metadata.token_positions).astype(np.int64)
    token_req = to_numpy(metadata.token_to_req).astype(np.int64)
    table = to_numpy(metadata.block_table).astype(np.int64)
    if positions.shape[0] < num_tokens:
        raise ValueError(f"metadata describes {positions.shape[0]} tokens but index_query has "
                         f"{num_tokens}")
    positions, token_req = positions[:num_tokens], token_req[:num_tokens]
    max_blocks = table.shape[1]
    nvis = visible_blocks(positions, bs)
    if (nvis > max_blocks).any():
        t = int(np.argmax(nvis > max_blocks))
        raise ValueError(f"token {t} at position {positions[t]} sees {nvis[t]} blocks but "
                         f"block_table rows hold {max_blocks}")

    scores = np.full((ispec.num_index_heads, num_tokens, max_blocks), -np.inf)
    keys_per_block = np.arange(bs)
    for r in np.unique(token_req[nvis > 0]):
        tokens = np.flatnonzero((token_req == r) & (nvis > 0))
        width = int(nvis[tokens].max())
        pages = table[r, :width]
        if ((pages < 0) | (pages >= num_blocks)).any():
            b = int(np.argmax((pages < 0) | (pages >= num_blocks)))
            raise ValueError(f"block_table[{r}, {b}] = {pages[b]} lies outside the index cache "
                             f"({num_blocks} blocks)")
        keys = cache[pages]                                             # [W, bs, D]
        step = max(1, chunk_elements // (ispec.num_index_heads * width * bs))
        for t0 in range(0, tokens.size, step):
            ts = tokens[t0:t0 + step]
            dots = np.einsum("thd,wsd->htws", q[ts], keys)              # [H, C, W, bs]
            key_pos = np.arange(width)[:, None] * bs + keys_per_block   # [W, bs]
            seen = key_pos[None] <= positions[ts][:, None, None]        # [C, W, bs]
            block_max = np.where(seen[None], dots, -np.inf).max(-1)     # NaN propagates
            visible = np.arange(width)[None, :] < nvis[ts][:, None]     # [C, W]
            scores[:, ts, :width] = np.where(visible[None], block_max, -np.inf)
    return select_blocks(ispec, scores, nvis[None, :]), scores
