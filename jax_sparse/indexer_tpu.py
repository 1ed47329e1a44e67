"""Pallas TPU (Mosaic TPU) kernel: the lightning indexer's block scores over a paged index-key
cache (`implementation="tpu"` of `jax_sparse.index_topk`; contract, section 6).

Plan, then run (`plan_index_tpu`, `index_scores_tpu`); the selection is `indexer.select_topk`
(XLA), the same for every implementation.

Plan (XLA, once per call). A tile is `tile_tokens` consecutive tokens of one request
(`indexer.plan_index_tiles`, tiles never straddle requests, so a mixed decode-first batch is
one launch). Per tile the plan gathers: the query rows, token-major and head-minor
([tile_tokens * heads, D], zeros past the request's end); each row's position (-1 past the
end); the request's block-table row with each page checked against the cache (pages outside
it are read as page 0 and score NaN, so no DMA leaves the cache); and the blocks to score, the
tile's largest visible count (its last token's).

Run. One program per tile: grid (num_tiles,), "parallel" (no state crosses programs). The
tile's pages (2 x max_blocks int32) and block count arrive through SMEM BlockSpecs, one block
per grid step (the whole block table of a 256-request batch at 1M tokens is 8 MB, past SMEM's
1 MiB); queries and positions through VMEM blocks; the cache stays in HBM (`pl.ANY`). The
program streams its pages through a ring of `pipeline_depth` VMEM slots with
`pltpu.make_async_copy` (page b + depth - 1 starts before page b is waited on). Each page is
one dot for every index head and token of the tile: keys [block_size, D] against the rows
[rows, D] (f32 accumulation) gives [block_size, rows], masked to keys j <= each row's position
and max-reduced over the keys (sublanes) to one [1, rows] vector; a NaN among the seen keys
makes the block's score NaN. Eight blocks' vectors fill one [8, rows] f32 tile (a full sublane
group), stored with a dynamic index on the output's leading dimension only.

Scores go to HBM ([num_tiles, max_blocks, rows] f32) and the XLA selection reads them: a
running top-k in vregs (the torch kernel's design) needs a sort network Mosaic TPU would have
to lower per block; the score buffer costs 4 B per (row, block), written once and read once,
against the 32 KB page (512 B per row at rows 64) each block's dot reads: under 1% more traffic.

VMEM per program (bf16, head 128, block 128, depth 4, rows = tile_tokens x heads = 64):
key ring 4 x 32 KB = 128 KB (FP8: 64 KB, plus the 16-bit copy of the page in use, 32 KB);
query block 2 x 64 x 128 x 2 B = 32 KB; the output block, double-buffered, 2 x max_blocks x
rows (lanes padded to 128) x 4 B = 1 KB per block of the table: 1 MB at 1k blocks (128k
tokens), 8 MB at 8k blocks (1M tokens), under v5e's 16 MiB default scoped VMEM limit and far
under its 128 MiB. SMEM per step: 2 x 2 x max_blocks x 4 B (64 KB at 8k blocks).

Roofline estimate (no TPU measurement; v5e: 197 bf16 TFLOP/s, 820 GB/s HBM; v6e: 918 TFLOP/s,
1640 GB/s). Per page: 32 KB of keys (bf16) and 2 x 128 x 128 x rows FLOP: rows 64 gives 64
FLOP/B, under both ridge points (v5e 240, v6e 560): HBM-bound, with 16 tokens x 4 heads per
page. A 64k-token prefill (4 heads, every token scoring all its visible blocks) reads each
request's pages once per 16-token tile: 4096 tiles x 256 pages on average x 32 KB = 34 GB,
41 ms on v5e (21 ms on v6e); its useful work is 2 x 128 x 4 x 64k x 32k keys = 2.2 TFLOP,
11 ms on v5e at the matmul peak, so larger tiles (rows 256: 4x fewer page reads) would move it
towards compute-bound. Decode at 32k contexts, batch 256: 256 x 256 pages x 32 KB = 2.1 GB,
2.6 ms on v5e (1.3 ms on v6e); batch 1 is one program reading 8 MB serially (10 us at peak
bandwidth, more with a single DMA stream in flight per core). Left out: exposed first DMAs,
grid-step overhead, the XLA plan and selection, the FP8 -> bf16 conversion on the VPU.

Mosaic constraints (as `tpu.py`): checked without a TPU only by lowering
(`lowering_platforms=("tpu",)`); block shapes keep their last two dims whole or (8, n);
2-D vectors with masks from `broadcasted_iota`; dynamic indices on leading dims only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from interop.tiling import cdiv

PIPELINE_DEPTH = 4   # key pages in flight: up to 3 copies behind the one in use
_SUBLANES = 8        # blocks per stored output tile ([8, rows] f32: one sublane group)


def plan_index_tpu(index_query, token_positions, block_table, query_start_loc, tile_req,
                   tile_start, *, num_blocks: int, block_size: int, tile_tokens: int):
    """Per-tile operands of the kernel (see the module docstring).

    Args:
      index_query: [num_tokens, heads, D]; token_positions: [num_tokens] int32;
      block_table: [num_reqs, max_blocks] int32; query_start_loc: [num_reqs + 1] int32;
      tile_req / tile_start: [num_tiles] int32 (`indexer.plan_index_tiles`);
      num_blocks: pages in the index cache.
    Returns (pages, count, positions, queries):
      pages: [num_tiles, 2, width] int32, width = max_blocks rounded up to 8: row 0 the page
        to read (0 where the table's page lies outside the cache), row 1 1 where it lies inside;
      count: [num_tiles, 1, 1] int32, the blocks the tile scores: its last live token's
        visible blocks (0: nothing to do);
      positions: [num_tiles, 1, rows] int32, rows = tile_tokens * heads (token-major), -1
        past the request's end;
      queries: [num_tiles, rows, D], zeros past the request's end.
    """
    num_tokens, heads, dim = index_query.shape
    num_tiles = tile_req.shape[0]
    max_blocks = block_table.shape[1]
    width = cdiv(max_blocks, _SUBLANES) * _SUBLANES
    end = query_start_loc.astype(jnp.int32)[tile_req + 1]
    token = tile_start[:, None] + jnp.arange(tile_tokens, dtype=jnp.int32)   # [tiles, tt]
    live = token < end[:, None]
    safe = jnp.clip(token, 0, num_tokens - 1)
    pos = jnp.where(live, token_positions[safe], -1)
    last = pos.max(axis=1)
    count = jnp.where(last >= 0, jnp.minimum(last // block_size + 1, max_blocks), 0)
    table = jnp.pad(block_table[tile_req], ((0, 0), (0, width - max_blocks)))
    inside = (table >= 0) & (table < num_blocks)
    pages = jnp.stack([jnp.where(inside, table, 0), inside.astype(jnp.int32)], axis=1)
    rows = tile_tokens * heads
    queries = jnp.where(live[:, :, None, None], index_query[safe], 0).reshape(num_tiles, rows, dim)
    positions = jnp.repeat(pos, heads, axis=1).reshape(num_tiles, 1, rows)
    return pages.astype(jnp.int32), count.astype(jnp.int32).reshape(num_tiles, 1, 1), \
        positions.astype(jnp.int32), queries


def _kernel(pages_ref, count_ref, pos_ref, q_ref, cache_ref, out_ref, ring, sems, *,
            depth: int):
    """pages_ref [2, width] and count_ref [1, 1] (SMEM); pos_ref [1, rows] int32 and q_ref
    [rows, D] (VMEM); cache_ref: the whole index cache (HBM); out_ref [width // 8, 8, rows]
    f32; ring [depth, block_size, D] (cache dtype); sems: DMA [depth]."""
    count = count_ref[0, 0]
    bs = ring.shape[1]
    rows = q_ref.shape[0]

    def copy(b):
        slot = lax.rem(b, depth)
        return pltpu.make_async_copy(cache_ref.at[pages_ref[0, b]], ring.at[slot], sems.at[slot])

    def start(b):
        @pl.when(b < count)
        def _():
            copy(b).start()

    for b in range(depth - 1):
        start(b)
    q = q_ref[...]
    pos = pos_ref[...]                                              # [1, rows]
    key = lax.broadcasted_iota(jnp.int32, (bs, rows), 0)
    sublane = lax.broadcasted_iota(jnp.int32, (_SUBLANES, rows), 0)

    def step(b, acc):
        start(b + depth - 1)  # into the slot page b - 1 finished with
        copy(b).wait()
        k = ring[lax.rem(b, depth)]
        if jnp.dtype(k.dtype).itemsize == 1:  # FP8: to 16 bits in VMEM (exact)
            k = k.astype(jnp.float32).astype(q.dtype)
        s = lax.dot_general(k, q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)     # [bs, rows]
        # Keys past a row's position may hold anything (NaN too): masked before the max.
        seen = b * bs + key <= pos
        best = jnp.where(seen, s, -jnp.inf).max(axis=0, keepdims=True)
        bad = jnp.where(seen & jnp.isnan(s), 1.0, 0.0).max(axis=0, keepdims=True) > 0
        best = jnp.where(bad | (pages_ref[1, b] == 0), jnp.nan, best)
        acc = jnp.where(sublane == lax.rem(b, _SUBLANES), best, acc)

        # (lax.div / lax.rem: b >= 0, and jnp's floor rounding lowers through a sign op
        # Mosaic resolves per TPU generation, unknown off a TPU.)
        @pl.when((lax.rem(b, _SUBLANES) == _SUBLANES - 1) | (b == count - 1))
        def _():
            out_ref[lax.div(b, _SUBLANES)] = acc

        return acc

    lax.fori_loop(0, count, step, jnp.full((_SUBLANES, rows), -jnp.inf, jnp.float32))


def index_scores_tpu(index_query, index_cache, token_positions, block_table, query_start_loc,
                     tile_req, tile_start, *, block_size: int, tile_tokens: int,
                     pipeline_depth: int = PIPELINE_DEPTH, interpret=None):
    """The block scores of `indexer.index_scores_xla` (see there) from the Pallas TPU kernel.

    Args:
      index_query: [num_tokens, heads, D] bfloat16 / float16.
      index_cache: (num_blocks, block_size, D), 16-bit or FP8.
      token_positions: [num_tokens] int32 (-1: padding); block_table: [num_reqs, max_blocks]
        int32; query_start_loc: [num_reqs + 1] int32.
      tile_req / tile_start: the tiles of `indexer.plan_index_tiles(query_start_loc, num_tiles,
        tile_tokens)`.
      pipeline_depth: VMEM ring slots, >= 2 (2: double buffering).
      interpret: None (interpret mode unless the default backend is a TPU), a bool, or a
        `pltpu.InterpretParams` (simulated DMAs; an error on any out-of-bounds copy).
    Returns: float32 [heads, num_tokens, max_blocks]; entries of blocks a token may not see
      are unspecified.
    """
    if not isinstance(pipeline_depth, int) or pipeline_depth < 2:
        raise ValueError(f"pipeline_depth ({pipeline_depth!r}) must be an int >= 2")
    num_tokens, heads, dim = index_query.shape
    max_blocks = block_table.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    pages, count, positions, queries = plan_index_tpu(
        index_query, token_positions, block_table, query_start_loc, tile_req, tile_start,
        num_blocks=index_cache.shape[0], block_size=block_size, tile_tokens=tile_tokens)
    num_tiles, _, width = pages.shape
    rows = tile_tokens * heads
    groups = width // _SUBLANES
    scores = pl.pallas_call(
        functools.partial(_kernel, depth=pipeline_depth),
        grid=(num_tiles,),
        in_specs=[
            pl.BlockSpec((None, 2, width), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, 1, 1), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, 1, rows), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, rows, dim), lambda i: (i, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, groups, _SUBLANES, rows), lambda i: (i, 0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_tiles, groups, _SUBLANES, rows), jnp.float32),
        scratch_shapes=[pltpu.VMEM((pipeline_depth, block_size, dim), index_cache.dtype),
                        pltpu.SemaphoreType.DMA((pipeline_depth,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name=f"index_scores_tpu_rows{rows}",
    )(pages, count, positions, queries, index_cache)
    # Back to [heads, num_tokens, max_blocks]: token t lies in the last tile starting at or
    # before it (tiles are in token order), at row (t - start) * heads + h.
    scores = scores.reshape(num_tiles, width, tile_tokens, heads)[:, :max_blocks]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tile = jnp.clip(jnp.searchsorted(tile_start, token, side="right") - 1, 0, num_tiles - 1)
    offset = jnp.clip(token - tile_start[tile], 0, tile_tokens - 1)
    return jnp.transpose(scores[tile, :, offset], (2, 0, 1))
