"""Framework-neutral tiling arithmetic: tile shapes, work bounds, chunk sizes and the prefill
dispatch thresholds that both front ends use (pure Python, static shapes only).

Each front end's kernels take these numbers as compile-time constants; keeping them here means
the PyTorch-Triton and the JAX-Pallas kernels agree on what a tile is, and a threshold measured
for one front end sits beside the other's, not in a second copy.

Prefill dispatch under prefill_algorithm="auto" (64/4 heads, top-16):

| rule                                   | torch_sparse (Triton)   | jax_sparse (Pallas)     |
|----------------------------------------|-------------------------|-------------------------|
| prefill tokens below which all "token" | UNION_MIN_TOKENS 16384  | UNION_MIN_TOKENS 16384  |
| tile union share given to "union"      | 0.375 (48 of 128)       | 0.25 (32 of 128)        |
| tiles left by "union" go to            | the token kernel        | the token kernel        |
| FP8 caches: union share                | 0.375 (as bf16)         | 0.25 (as bf16)          |

torch_sparse's column is `torch_sparse.dispatch.PREFILL_RULE` (benchmarks/auto_rule.py times it
against candidates); jax_sparse keeps its constants in `jax_sparse.dispatch`.
"""
from __future__ import annotations

import dataclasses

# Tensor-core dots need at least 16 rows: the token kernel pads a GQA group up to this.
MIN_ROWS = 16

# Union tiles: query rows a tile aims for (tokens x padded GQA group); wgmma takes 64 rows per
# warpgroup, two warpgroups' worth. Tokens per tile at most: the union and its per-entry token
# bitmask (int32) stay small, and tokens further apart share fewer blocks.
UNION_TILE_ROWS = 128
UNION_MAX_TILE_TOKENS = 16
# Union plan workspace per chunk of tokens, and an upper estimate of its bytes per (KV head,
# token, top-k column) entry (sort operands and results, run flags, scatter temporaries).
UNION_PLAN_BYTES = 1 << 29
UNION_PLAN_BYTES_PER_ENTRY = 128

# Key-to-query tiles: query rows per tile (one warpgroup's wgmma M of 64).
K2Q_TILE_ROWS = 64
# K2Q workspace per chunk of tokens (partial outputs, log-sum-exps and the plan), and an upper
# estimate of the plan's bytes per (KV head, token, column) entry.
K2Q_WORKSPACE_BYTES = 1 << 30
K2Q_PLAN_BYTES_PER_ENTRY = 96

# "auto" keeps prefills of fewer tokens on the token kernel in both front ends: too few tiles
# to gain from planning unions (a sort per tile) and launching more kernels. H100: at 4 x 2048
# new tokens after 8192 with random selections, planning costs more than the small-union tiles
# save (64/4: 0.91x the token kernel; 16/1: 0.79x); at 16k tokens it no longer does (64/4
# random: 1.09x; correlated: 1.74x).
UNION_MIN_TOKENS = 16384


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_rows(num_queries_per_kv: int) -> int:
    """Query rows of one token's GQA group in a token-kernel program: padded to a power of two
    of at least MIN_ROWS."""
    return max(MIN_ROWS, next_power_of_2(num_queries_per_kv))


def union_tile_tokens(num_queries_per_kv: int) -> int:
    """Tokens per union tile: UNION_TILE_ROWS rows of GQA groups padded to a power of two,
    1 to UNION_MAX_TILE_TOKENS (groups of 1 and 2 get 16- and 32-row tiles)."""
    return max(1, min(UNION_MAX_TILE_TOKENS,
                      UNION_TILE_ROWS // next_power_of_2(num_queries_per_kv)))


def union_tokens_per_chunk(num_kv_heads: int, topk: int, tile_tokens: int) -> int:
    """Tokens one union plan covers within UNION_PLAN_BYTES: whole tiles, at least one."""
    per_tile = num_kv_heads * topk * tile_tokens * UNION_PLAN_BYTES_PER_ENTRY
    return max(1, UNION_PLAN_BYTES // per_tile) * tile_tokens


def max_union(num_queries_per_kv: int, topk: int, share: float) -> int:
    """The largest tile union (blocks per KV head) that "auto" gives to the union kernel: the
    front end's measured `share` of a tile's tile_tokens * topk selections."""
    return int(share * union_tile_tokens(num_queries_per_kv) * topk)


def k2q_tile_shape(num_queries_per_kv: int) -> tuple[int, int]:
    """(group_pad, pairs): the GQA group padded to a power of two, and the (token, group) pairs
    per query tile, so that a tile has K2Q_TILE_ROWS rows (more when one padded group alone is
    larger)."""
    group_pad = next_power_of_2(num_queries_per_kv)
    return group_pad, max(1, K2Q_TILE_ROWS // group_pad)


def k2q_tokens_per_chunk(num_kv_heads: int, num_heads: int, head_size: int, topk: int,
                         partial_bytes: int) -> int:
    """Tokens whose k2q partial outputs (`partial_bytes` per element), float32 log-sum-exps and
    plan fit in K2Q_WORKSPACE_BYTES (at least one)."""
    per_token = topk * (num_heads * (head_size * partial_bytes + 4)
                        + num_kv_heads * K2Q_PLAN_BYTES_PER_ENTRY)
    return max(1, K2Q_WORKSPACE_BYTES // per_token)


def max_k2q_items(num_kv_heads: int, num_tokens: int, topk: int, num_blocks: int,
                  num_reqs: int, max_blocks: int, pairs_per_item: int) -> int:
    """Upper bound on the k2q work items of `num_tokens` tokens, from shapes only (at least 1,
    so a grid is never empty).

    S segments (KV head, page) holding E pairs in all make sum ceil(c_s / C) <= (E + S (C - 1))
    / C items of at most C pairs; a KV head has at most min(num_blocks, num_reqs * max_blocks,
    num_tokens * topk) segments.
    """
    pairs = num_kv_heads * num_tokens * topk
    segments = num_kv_heads * min(num_blocks, num_reqs * max_blocks, num_tokens * topk)
    return max(1, (pairs + segments * (pairs_per_item - 1)) // pairs_per_item)


@dataclasses.dataclass(frozen=True)
class PrefillThresholds:
    """A front end's "auto" rule for prefill rows, from static shapes and the device-side tile
    unions only (no host sync).

    union_min_tokens: prefills of fewer tokens run on the token kernel alone.
    union_share: a larger prefill gives each tile whose union (largest over the KV heads) is at
      most this share of its tile_tokens * topk selections to the union kernel.
    fp8_union_share: the same share for FP8 caches; None keeps FP8 caches on the token kernel.
    k2q_min_tokens: the tiles the union kernel leaves go to k2q in prefills of at least this
      many tokens; None (or a smaller prefill): to the token kernel.
    """

    union_min_tokens: int
    union_share: float
    fp8_union_share: float | None = None
    k2q_min_tokens: int | None = None

    def __post_init__(self):
        for name in ("union_share", "fp8_union_share"):
            share = getattr(self, name)
            if share is not None and not 0.0 <= share <= 1.0:
                raise ValueError(f"PrefillThresholds.{name} ({share}) must lie in [0, 1]")

    def max_union(self, num_queries_per_kv: int, topk: int, fp8: bool = False) -> int | None:
        """The largest tile union given to the union kernel; None: the token kernel alone."""
        share = self.fp8_union_share if fp8 else self.union_share
        return None if share is None else max_union(num_queries_per_kv, topk, share)

    def leftover_to_k2q(self, prefill_tokens: int) -> bool:
        """Whether the tiles the union kernel leaves go to k2q (else to the token kernel)."""
        return self.k2q_min_tokens is not None and prefill_tokens >= self.k2q_min_tokens


# Lightning indexer (torch_sparse/indexer.py, jax_sparse/indexer.py). A scoring tile is
# INDEX_TILE_ROWS rows of (token, index head) pairs of one request, heads padded to a power of
# two: its tokens share every index-key page it loads (one [block_size, head] page per step),
# so the rows amortize the page read. Each row keeps a running top-k of next_power_of_2(topk)
# slots. Grids of fewer than INDEX_TARGET_PROGRAMS tiles (decode batches) split each row's
# visible blocks into up to INDEX_MAX_SPLITS ranges of at least INDEX_MIN_SPLIT_BLOCKS blocks,
# whose partial top-ks a merge combines (batch 1 at 32k tokens: 128 ranges of 2 blocks, one
# per SM, so a step's latency is one program's two page reads, not four).
INDEX_TILE_ROWS = 64
INDEX_TARGET_PROGRAMS = 264  # two waves of an H100 / H200's 132 SMs
INDEX_MAX_SPLITS = 128
INDEX_MIN_SPLIT_BLOCKS = 2


def index_tile_tokens(num_index_heads: int, max_query_len: int | None = None) -> int:
    """Tokens per scoring tile: INDEX_TILE_ROWS rows of padded heads; for decode requests of
    `max_query_len` tokens, that many (a power of two)."""
    tokens = max(1, INDEX_TILE_ROWS // next_power_of_2(num_index_heads))
    if max_query_len is not None:
        tokens = min(tokens, next_power_of_2(max_query_len))
    return tokens


def index_tile_rows(num_index_heads: int, tile_tokens: int) -> int:
    """Rows of a scoring tile: tokens x padded heads, at least MIN_ROWS (tensor-core dots)."""
    return max(MIN_ROWS, tile_tokens * next_power_of_2(num_index_heads))


def index_num_splits(num_tiles: int, max_blocks: int) -> int:
    """Block ranges per tile, from static shapes only (a CUDA graph / jit sees one value): a
    power of two that brings the grid towards INDEX_TARGET_PROGRAMS, each range holding at
    least INDEX_MIN_SPLIT_BLOCKS of the block table's `max_blocks` columns."""
    splits = 1
    while (splits * 2 <= INDEX_MAX_SPLITS and num_tiles * splits * 2 <= INDEX_TARGET_PROGRAMS
           and max_blocks >= splits * 2 * INDEX_MIN_SPLIT_BLOCKS):
        splits *= 2
    return splits


def index_split_slots(topk_blocks: int, max_blocks: int, splits: int) -> int:
    """Candidates a split keeps per row: next_power_of_2(topk_blocks), or fewer when no range
    can hold that many blocks (a range keeps all its blocks then: nothing is evicted early),
    so the merge reads splits x this many keys per row."""
    slots = next_power_of_2(topk_blocks)
    if splits == 1:
        return slots
    return min(slots, next_power_of_2(cdiv(max_blocks, splits)))


def index_max_tiles(num_tokens: int, num_reqs: int, tile_tokens: int) -> int:
    """An upper bound on the scoring tiles of a batch (tiles never straddle requests): the
    whole tiles of its tokens plus one partial tile per request (at least 1)."""
    return max(1, cdiv(num_tokens, tile_tokens) + num_reqs)
