"""Pallas TPU (Mosaic TPU) kernel: block-sparse GQA attention over a paged cache.

Plan, then run (`plan_tpu`, `paged_sparse_attention_tpu`).

Plan (XLA, once per call). Tokens are cut into tiles of `tile_tokens`. For every (KV head,
tile) the plan resolves each top-k entry of the tile's tokens through `select_rows` (the rules
every implementation shares) into a work item (physical page, visible keys, token in the tile)
and moves the valid items to the front of the tile's list, keeping their order: a list of
tile_tokens * topk items whose first `num_work` are the pages to read, grouped by token.
Invalid entries (sentinels, future blocks, pages outside the table or the cache, repeats of an
earlier entry of the row) never become work, so they cost no DMA and no read can leave the
cache; a token with no valid entry has no work and its output rows stay the zeros the program
starts from.

Run. One program per (token tile, KV head): grid (num_tiles, num_kv_heads), both "parallel"
(no state crosses programs, so megacore chips may split either axis). The program's work list
and its count arrive through SMEM BlockSpecs, one small block per grid step (the whole top-k
of a 64k-token prefill is 4M ints = 16 MB, far past SMEM's 1 MiB, so nothing is scalar-
prefetched whole). The GQA group's query rows, padded to a sublane multiple (16 for 16-bit
queries: one packed vreg), come through a VMEM BlockSpec; the cache stays in HBM
(`memory_space=pl.ANY`). The program streams its work items' K and V pages (and the page's
128 per-slot scales) through a ring of `pipeline_depth` VMEM slots with
`pltpu.make_async_copy`: item j + depth - 1 is started before item j is waited on, so up to
depth - 1 page copies are in flight while one page is computed (depth 2: double buffering).
Each item is one online-softmax step (natural exp, fp32 state) on the item's token; when the
token changes, the finished token's rows are normalized and stored. A tile's items form one
stream, so the ring stays full across the tile's tokens and only a program's first copies are
exposed.

Per page: K and V are [block_size, head_size] slices of one KV head (HND: contiguous 32 KB in
bf16; NHD: block_size rows of head_size at a stride of num_kv_heads * head_size); FP8 pages
arrive as FP8 (half the bytes) and are dequantized in VMEM to the query dtype (exact: every
e4m3 / e5m2 value is a bfloat16 and a float16 value); a per-slot scale multiplies the scores
(K) and the probabilities (V) per key, a scalar one (SMEM) the softmax scale (K) and the output
(V). Keys past the token in its own block are masked in the scores and zeroed in V (they may
hold anything, NaN included).

Why manual DMAs rather than BlockSpec index maps over scalar-prefetched tables (grid
(tile, head, topk), the page chosen by the index map): (1) that needs the top-k and the block
table whole in SMEM, which does not fit large calls; (2) each page would be a grid step, whose
fixed cost (pipeline bookkeeping, DMA issue and wait) is paid per 32-64 KB page, which HBM
delivers in 20-80 ns on v5e / v6e, and invalid entries would still be steps; (3) the pipeline
keeps one block in flight, where the ring keeps depth - 1; (4) the BlockSpec of an NHD page of
one head squeezes the cache's second-minor dimension (the head), which the TPU lowering rejects
for blocks when num_kv_heads > 1 (last two block dims must be (8, 128) multiples or whole).
The DMA count is the same (two per valid page, four with per-slot scales), but only valid
pages are copied.

VMEM per program (bf16 query and cache, head_size 128, block_size 128, group padded to 16,
tile_tokens 8, depth 4): K and V rings 2 * 4 * 32 KB = 256 KB (FP8: 128 KB), per-slot scale
rings 2 * 4 * 4 KB (one [1, 128] f32 row padded to 8 sublanes), query and output blocks double-
buffered by the pipeline 2 * 2 * 8 * 16 * 128 * 2 B = 128 KB: about 420 KB, under 1% of the
128 MiB of VMEM per core of v5e and v6e (no vmem_limit_bytes needed); SMEM per step 2 * 1.5 KB
of work list (SMEM: 1 MiB per core).

`prefill_algorithm`: every value runs this one kernel ("token" work per token and KV head, with
the tile's pages streamed back to back); the GPU paths' tile unions and key-to-query plans are
not ported. Decode and prefill tokens (speculative decode included) are the same work items,
so a mixed batch is one launch.

Mosaic constraints. Checked without a TPU: the kernel lowers for TPU (block shapes: the last
two dims of every block are whole). Designed for but only checkable by the TPU compiler
(Mosaic's layout passes run there; interpret mode enforces nothing): FP8 ring slots of 128
rows (a multiple of the 32-row 1-byte tile), 2-D vectors only (masks from
`broadcasted_iota`), dynamic indices only on leading (untiled) dims of VMEM refs, FP8 ->
float32 -> 16-bit conversions, and the NHD per-head page slice (the HBM cache's second-minor
dimension squeezed) as a strided DMA source; with num_kv_heads == 1 (M3 at tensor parallel 4)
NHD and HND pages are the same bytes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from interop import SparseAttentionSpec, check_prefill_algorithm

from .selection import MASK_VALUE, select_rows
from .validation import check_knobs

TILE_TOKENS = 8      # tokens per program: their pages stream through one DMA ring
PIPELINE_DEPTH = 4   # VMEM slots per ring: up to 3 page copies in flight behind the one in use
_PAGE, _KEYS, _TOKEN = range(3)  # rows of a work list


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """The knobs of implementation="tpu" (`paged_sparse_attention_tpu`'s keywords).

      tile_tokens: tokens per program; None: min(TILE_TOKENS, num_tokens).
      pipeline_depth: VMEM ring slots per K / V stream, >= 2 (2: double buffering).
    """

    tile_tokens: int | None = None
    pipeline_depth: int = PIPELINE_DEPTH

    def __post_init__(self):
        check_knobs(self, tile_tokens=1, pipeline_depth=2)

    @classmethod
    def get_default(cls) -> "TpuConfig":
        return cls()


def row_tile(num_queries_per_kv: int, dtype) -> int:
    """Query rows per program: the GQA group padded to a multiple of the sublanes one vreg
    holds for `dtype` (8 for 32-bit, 16 for 16-bit)."""
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    return -(-num_queries_per_kv // sublanes) * sublanes


def plan_tpu(spec: SparseAttentionSpec, topk_indices, token_to_req, token_positions,
             block_table, *, num_blocks: int, tile_tokens: int):
    """The work lists of `paged_sparse_attention_tpu` (see the module docstring).

    Args:
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding).
      block_table: [num_reqs, max_blocks] int32; num_blocks: pages in the cache.
    Returns (work, num_work):
      work: [num_tiles, num_kv_heads, 3, tile_tokens * topk] int32, num_tiles =
        ceil(num_tokens / tile_tokens); rows: the physical page, the keys of that page the token
        sees (1..block_size: keys j <= position, `key_mask`'s count), the token's index in the
        tile. The first num_work items are the tile's valid entries, grouped by token in
        token order; the rest are (0, 0, 0).
      num_work: [num_tiles, num_kv_heads, 1, 1] int32 (trailing unit dims: an SMEM block's
        last two dims must be whole).
    """
    num_tokens = token_positions.shape[0]
    num_kv_heads, bs = spec.num_kv_heads, spec.block_size
    num_tiles = -(-num_tokens // tile_tokens)
    pad = num_tiles * tile_tokens - num_tokens
    positions = jnp.pad(token_positions, (0, pad), constant_values=-1)
    num_reqs, max_blocks = block_table.shape
    req = jnp.clip(jnp.pad(token_to_req, (0, pad)), 0, num_reqs - 1)
    rows = jnp.pad(topk_indices[:, :num_tokens], ((0, 0), (0, pad), (0, 0)),
                   constant_values=-1)                       # [G, T, K]
    pos = positions[None, :, None]
    valid, block, page = select_rows(
        rows, pos, lambda b: block_table[req[None, :, None], b], block_size=bs,
        max_blocks=max_blocks, num_blocks=num_blocks)
    keys = jnp.where(valid, jnp.minimum(pos + 1 - block * bs, bs), 0)
    token = jnp.broadcast_to((jnp.arange(num_tiles * tile_tokens, dtype=jnp.int32)
                              % tile_tokens)[None, :, None], rows.shape)

    def per_tile(x):  # [G, T, K] -> [num_tiles, G, tile_tokens * K]
        x = x.reshape(num_kv_heads, num_tiles, -1)
        return jnp.swapaxes(x, 0, 1)

    valid = per_tile(valid)
    order = jnp.argsort(~valid, axis=-1, stable=True)        # valid items first, in order
    items = [jnp.take_along_axis(per_tile(x), order, axis=-1) for x in (page, keys, token)]
    kept = jnp.take_along_axis(valid, order, axis=-1)
    work = jnp.where(kept[:, :, None], jnp.stack(items, axis=2), 0).astype(jnp.int32)
    return work, valid.sum(axis=-1, dtype=jnp.int32)[..., None, None]


def _kernel(work_ref, num_work_ref, q_ref, cache_ref, k_scale_ref, v_scale_ref, out_ref,
            k_buf, v_buf, k_scale_buf, v_scale_buf, sems, *, layout: str, depth: int,
            sm_scale: float):
    """work_ref: [3, W] and num_work_ref: [1, 1] (SMEM); q_ref / out_ref: [tile, rows, D];
    cache_ref: the whole physical cache (HBM); k/v_scale_ref: None, [1] f32 (SMEM) or
    [num_kv_heads, num_slots] f32 (HBM); k/v_buf: [depth, bs, D] VMEM rings (cache dtype);
    k/v_scale_buf: [depth, 1, bs] f32 rings (per-slot scales) or None; sems: DMA [2, depth]."""
    head = pl.program_id(1)
    num_work = num_work_ref[0, 0]
    bs = k_buf.shape[1]
    compute_dtype = q_ref.dtype
    per_slot = k_scale_buf is not None

    def copies(item, slot):
        """The DMAs of one work item into ring slot `slot`: K, V (and their scales)."""
        page = work_ref[_PAGE, item]
        out = []
        for kv, buf, scale_ref, scale_buf in ((0, k_buf, k_scale_ref, k_scale_buf),
                                              (1, v_buf, v_scale_ref, v_scale_buf)):
            src = (cache_ref.at[page, kv, :, head, :] if layout == "NHD"
                   else cache_ref.at[page, kv, head])
            out.append(pltpu.make_async_copy(src, buf.at[slot], sems.at[kv, slot]))
            if per_slot:
                out.append(pltpu.make_async_copy(
                    scale_ref.at[pl.ds(head, 1), pl.ds(page * bs, bs)], scale_buf.at[slot],
                    sems.at[kv, slot]))
        return out

    def start(item):
        @pl.when(item < num_work)
        def _():
            for c in copies(item, item % depth):
                c.start()

    def store(token, acc, l):
        """Normalize and write one token's rows (every stored token saw >= 1 key: l > 0)."""
        out = acc / l
        if v_scale_ref is not None and not per_slot:
            out = out * v_scale_ref[0]
        out_ref[token] = out.astype(out_ref.dtype)

    score_scale = sm_scale
    if k_scale_ref is not None and not per_slot:
        score_scale = score_scale * k_scale_ref[0]
    rows, head_size = q_ref.shape[1:]
    init = (jnp.zeros((rows, head_size), jnp.float32),
            jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)  # tokens with no work stay zeros
    for item in range(depth - 1):
        start(item)

    def step(item, carry):
        token = work_ref[_TOKEN, item]
        previous = work_ref[_TOKEN, jnp.maximum(item - 1, 0)]
        new_token = (item > 0) & (token != previous)

        @pl.when(new_token)
        def _():
            store(previous, carry[0], carry[2])

        acc, m, l = (jnp.where(new_token, fresh, kept) for fresh, kept in zip(init, carry))
        start(item + depth - 1)  # into the slot step item - 1 finished with
        slot = item % depth
        for c in copies(item, slot):
            c.wait()

        keys = work_ref[_KEYS, item]
        q = q_ref[token]
        k = k_buf[slot]
        v = v_buf[slot]
        if jnp.dtype(k.dtype).itemsize == 1:  # FP8: dequantize in VMEM (exact in 16 bits)
            k = k.astype(jnp.float32).astype(compute_dtype)
            v = v.astype(jnp.float32).astype(compute_dtype)
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [rows, bs]
        if per_slot:
            scores = scores * k_scale_buf[slot]
        seen = lax.broadcasted_iota(jnp.int32, (1, bs), 1) < keys  # keys j <= position
        scores = jnp.where(seen, scores * score_scale, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(seen, jnp.exp(scores - m_new), 0.0)
        l = alpha * l + p.sum(axis=-1, keepdims=True)
        if per_slot:
            p = p * v_scale_buf[slot]
        # Keys past the token may hold anything (NaN too): zero them before the dot.
        v = jnp.where(lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < keys, v, 0)
        acc = alpha * acc + lax.dot_general(p.astype(compute_dtype), v,
                                            (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
        return acc, m_new, l

    acc, _, l = lax.fori_loop(0, num_work, step, init)

    @pl.when(num_work > 0)
    def _():
        store(work_ref[_TOKEN, num_work - 1], acc, l)


def _scale_operand(scale):
    """(operand, BlockSpec) of a scale: None; one scalar in SMEM; per-slot rows left in HBM."""
    if scale is None:
        return None, None
    if scale.ndim == 1:
        return scale, pl.BlockSpec(memory_space=pltpu.SMEM)
    return scale, pl.BlockSpec(memory_space=pl.ANY)


def paged_sparse_attention_tpu(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                               token_to_req, token_positions, block_table, k_scale=None,
                               v_scale=None, *, tile_tokens: int | None = None,
                               pipeline_depth: int = PIPELINE_DEPTH, interpret=None):
    """Launch the kernel over a decode-first (or any) batch; inputs already validated.

    Args:
      query: [num_tokens, num_heads, head_size] bfloat16 / float16.
      kv_cache: the physical cache in spec.kv_cache_layout (NHD: [num_blocks, 2, block_size,
        num_kv_heads, head_size]; HND: [num_blocks, 2, num_kv_heads, block_size, head_size]),
        the spec's storage dtype.
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding, zeros out).
      block_table: [num_reqs, max_blocks] int32.
      k_scale / v_scale: None, [1] float32 (one scale) or [num_kv_heads, num_blocks *
        block_size] float32 (per slot); FP8 caches only.
      tile_tokens: tokens per program (default min(TILE_TOKENS, num_tokens)).
      pipeline_depth: VMEM ring slots per K / V stream, >= 2 (2: double buffering).
      interpret: None (interpret mode unless the default backend is a TPU), a bool, or a
        `pltpu.InterpretParams` (the TPU interpreter: simulated DMAs and semaphores, and an
        error on any out-of-bounds read).
    Returns: [num_tokens, num_heads, head_size] in the query dtype.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, group, bs = spec.num_kv_heads, spec.num_queries_per_kv, spec.block_size
    TpuConfig(tile_tokens, pipeline_depth)  # checks both
    tile = tile_tokens or min(TILE_TOKENS, num_tokens)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    work, num_work = plan_tpu(spec, topk_indices, token_to_req, token_positions, block_table,
                              num_blocks=kv_cache.shape[0], tile_tokens=tile)
    num_tiles, _, _, width = work.shape

    rows = row_tile(group, query.dtype)
    q = query.reshape(num_tokens, num_kv_heads, group, head_size)
    q = jnp.pad(q, ((0, num_tiles * tile - num_tokens), (0, 0), (0, rows - group), (0, 0)))
    k_scale, k_spec = _scale_operand(k_scale)
    v_scale, v_spec = _scale_operand(v_scale)
    per_slot = k_scale is not None and k_scale.ndim == 2
    ring = (pipeline_depth, bs, head_size)
    scale_ring = pltpu.VMEM((pipeline_depth, 1, bs), jnp.float32) if per_slot else None
    row_block = pl.BlockSpec((tile, None, rows, head_size), lambda i, g: (i, g, 0, 0))
    kernel = functools.partial(_kernel, layout=spec.kv_cache_layout, depth=pipeline_depth,
                               sm_scale=spec.scale)
    out = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, 3, width), lambda i, g: (i, g, 0, 0),
                         memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, 1, 1), lambda i, g: (i, g, 0, 0),
                         memory_space=pltpu.SMEM),
            row_block,
            pl.BlockSpec(memory_space=pl.ANY),
            k_spec, v_spec,
        ],
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, query.dtype),
        scratch_shapes=[pltpu.VMEM(ring, kv_cache.dtype), pltpu.VMEM(ring, kv_cache.dtype),
                        scale_ring, scale_ring, pltpu.SemaphoreType.DMA((2, pipeline_depth))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=f"sparse_attention_tpu_{spec.kv_cache_layout}_rows{rows}_tile{tile}",
    )(work, num_work, q, kv_cache, k_scale, v_scale)
    return out[:num_tokens, :, :group].reshape(num_tokens, num_heads, head_size)


def sparse_attention_tpu(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                         token_to_req, token_positions, block_table, k_scale=None,
                         v_scale=None, *, num_decode_tokens, prefill_algorithm: str = "auto",
                         tile_tokens: int | None = None, pipeline_depth: int = PIPELINE_DEPTH,
                         interpret=None):
    """`implementation="tpu"` of `jax_sparse.sparse_attention`: the whole decode-first batch in
    one launch of `paged_sparse_attention_tpu` (arguments as there, inputs validated).

    num_decode_tokens: accepted for the common signature; decode and prefill tokens are the same
      work items here, so the split does not matter.
    prefill_algorithm: checked ("auto", "token", "union" or "k2q"); every value runs the same
      kernel (the GPU paths' union and key-to-query plans are not ported to TPU).
    """
    del num_decode_tokens
    check_prefill_algorithm(prefill_algorithm)
    return paged_sparse_attention_tpu(spec, query, kv_cache, topk_indices, token_to_req,
                                      token_positions, block_table, k_scale, v_scale,
                                      tile_tokens=tile_tokens, pipeline_depth=pipeline_depth,
                                      interpret=interpret)
