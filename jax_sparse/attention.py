"""The Pallas kernel family: block-sparse GQA attention over a paged cache, prefill and decode.

One program per (token, KV head, split): the GQA group's query rows (padded to a tile of at
least 16 for the dot) attend the split's share of the row's top-k blocks, one 128-token page
per step (`_attend_block`), with an online softmax in fp32 (base 2). Decode and prefill tokens
are the same work item: a token only needs its request, its position and its top-k row, so a
mixed batch is one launch. With one split the kernel writes the final output; with more, each
split writes a partial (output, log2-sum-exp) pair that `_merge_splits` combines.

The paged cache, the block table and the top-k rows are passed whole (no blocking): pages are
loaded at dynamic offsets inside the kernel. On a GPU this lowers through Pallas' Triton
backend; elsewhere it runs in interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from interop import SparseAttentionSpec
from interop.tiling import group_rows

from .pages import cache_operand, load_page
from .selection import LOG2E, MASK_VALUE, first_in_row, key_mask, select_pages
from .validation import check_knobs

# Grid programs worth filling before splitting the top-k blocks further (about two waves of
# an H100's 132 SMs). H100, per layer inside an 8-layer jitted decode step, L2 cold
# (benchmarks/model_step.py's method): with 128, FP8 64/4 batch 16 ran 2 splits in 29.4 us
# against 25.8 us with 4; FP8 16/1 batch 64, 31.7 against 26.5; bf16 16/1 batch 64, 37.4
# against 34.3.
TARGET_PROGRAMS = 256
# Decode-sized grids run faster with 8 warps (H100, batch 64: 102 us against 129 us with 4);
# prefill-sized grids with 4 (64/4 heads, 16k tokens: 10.7 ms against 11.7 ms with 8); FP8
# caches with 4 at every size (64/4, batch 16: 46-49 us against 65-70 us with 8).
WIDE_GRID = 1024


def group_tile(num_queries_per_kv: int) -> int:
    """Query rows per program: the GQA group padded to a power of two of at least 16
    (`interop.tiling.group_rows`)."""
    return group_rows(num_queries_per_kv)


def default_num_splits(num_tokens: int, num_kv_heads: int, topk_blocks: int) -> int:
    """Splits of each top-k row, from static shapes only: split until the grid is full,
    keeping at least two blocks per split and the row evenly divided."""
    splits = 1
    while (topk_blocks % (2 * splits) == 0 and topk_blocks // (2 * splits) >= 2
           and num_tokens * num_kv_heads * splits * 2 <= TARGET_PROGRAMS):
        splits *= 2
    return splits


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """The knobs of implementation="pallas": the token kernel's (the union and k2q kernels take
    theirs from their modules' constants). Field names are `paged_sparse_attention`'s keywords.

      num_splits: splits of each top-k row, a divisor of topk_blocks; None: from the static
        shapes (`default_num_splits`).
      num_warps: Triton warps per program; None: 8 for grids of at most WIDE_GRID (token, KV
        head) pairs over a 16-bit cache, else 4.
      num_stages: Triton software-pipeline stages of the page loop.
    """

    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        check_knobs(self, num_splits=1, num_warps=1, num_stages=1)

    @classmethod
    def get_default(cls) -> "PallasConfig":
        return cls()


def _scale(scale_ref, head, slots):
    """The dequantization scale of a page's slots: [1, block_size] per slot, or one scalar."""
    if scale_ref.ndim == 2:
        return scale_ref[head, slots][None, :]
    return scale_ref[0]


def fp16_rows(q, row_scale):
    """FP8 caches compute in float16 (FP8 -> float16 is one conversion instruction per pair;
    -> bfloat16 takes several): each query row of q [rows, D] is scaled by (about) a power of
    two so its largest magnitude lies near 2^14 (no overflow; bfloat16's 8 significant bits fit
    in float16's 11). Returns (float16 rows, row_scale [rows] divided by that scale, which
    undoes it in the scores)."""
    qf = q.astype(jnp.float32)
    amax = jnp.abs(qf).max(axis=-1)
    shift = 14.0 - jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 16384.0)))  # zero row: 0
    q_scale = jnp.exp2(jnp.clip(shift, -120.0, 100.0))
    return (qf * q_scale[:, None]).astype(jnp.float16), row_scale / q_scale


def drop_nonfinite(v):
    """(v with its non-finite rows zeroed, bad [block_size] bool: those rows), for a page's
    values v [block_size, D] that rows attend through different masks (union tiles, k2q items).

    P @ V multiplies every row's 0 weight by every loaded V row, and 0 * NaN is NaN: a NaN or
    Inf value of a key that one row attends would reach every row of the tile. Zeroed here, it
    reaches only the rows that attend it, through `poison_rows`.
    """
    bad = jnp.where(jnp.isfinite(v), 0, 1).max(axis=-1) > 0
    return jnp.where(bad[:, None], jnp.zeros((), v.dtype), v), bad


def poison_rows(mask, bad):
    """[rows] f32: NaN for a row of mask [rows, block_size] that attends a `drop_nonfinite`
    key, else 0; added to the row's softmax sum, it makes that row (and only it) NaN."""
    return jnp.where(jnp.where(mask & bad[None, :], 1, 0).max(axis=-1) > 0, jnp.nan, 0.0)


def normalize(acc, m, l, attended):
    """(out [rows, D] f32, lse [rows] f32, base 2) of an online softmax's state.

    attended: bool, a scalar or [rows]: the row attended at least one key. A row that attended
    nothing gives zeros and lse -inf. An attended row divides by l whatever l holds, so
    garbage gives what the reference gives (contract, section 5): l is NaN when a score or an
    attended value was (a NaN or Inf query, a NaN in an attended slot) and 0 when every score
    was -inf (an Inf query): both make the row NaN, and its lse NaN (never -inf, which would
    read as "attended nothing" in `_merge_splits`).
    """
    attended = jnp.broadcast_to(attended, l.shape)
    out = jnp.where(attended[:, None], acc / jnp.where(attended, l, 1.0)[:, None], 0.0)
    lse = jnp.where(attended, jnp.where(l > 0, m + jnp.log2(l), jnp.nan), -jnp.inf)
    return out, lse


def _attend_block(carry, q, page, load_mask, mask, head, cache_ref, k_scale_ref, v_scale_ref, *,
                  layout: str, block_size: int, score_scale: float, packed_dtype=None):
    """One online-softmax step over one selected page: the step every kernel family shares.

    carry: (acc [rows, D] f32, m [rows] f32 running max (base 2), l [rows] f32 running sum).
    q: [rows, D] in the compute dtype (the query's; float16 for an FP8 cache); score_scale:
    [rows] f32, softmax scale * log2(e) per row.
    load_mask: [block_size] keys of this page some row attends (the others are not read).
    mask: [rows or 1, block_size] keys each row attends (all False for an invalid entry);
    within load_mask.
    Where the rows' masks differ (a union tile), a non-finite V value of a key one row attends
    also reaches the tile's other rows (0 * NaN); keys outside load_mask are never read
    (README, "Bad input"; scrubbing V here cost the Triton-backend union 1.2x on the H200).
    """
    acc, m, l = carry
    # Keys no row attends (past the tokens, or of a masked page) may hold anything, NaN
    # included: never read.
    k = load_page(cache_ref, page, 0, head, layout, load_mask, packed_dtype).astype(q.dtype)
    scores = plgpu.dot(q, k, trans_b=True)  # [rows, block_size] f32
    slots = pl.ds(page * block_size, block_size)
    if k_scale_ref is not None:
        scores = scores * _scale(k_scale_ref, head, slots)
    scores = jnp.where(mask, scores * score_scale[:, None], MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(mask, jnp.exp2(scores - m_new[:, None]), 0.0)
    l = alpha * l + p.sum(axis=-1)
    if v_scale_ref is not None:
        p = p * _scale(v_scale_ref, head, slots)
    v = load_page(cache_ref, page, 1, head, layout, load_mask, packed_dtype).astype(q.dtype)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(q.dtype), v)
    return acc, m_new, l


def block_attender(q, head, cache_ref, k_scale_ref, v_scale_ref, *, layout: str,
                   block_size: int, score_scale: float, fp16_compute: bool, packed_dtype=None):
    """(attend, init): `_attend_block` bound to the query rows q [rows, D] of KV head `head`
    (in float16 with per-row scales for an FP8 cache: `fp16_rows`), called as
    attend(carry, page=, load_mask=, mask=); and the empty online-softmax carry."""
    rows = q.shape[0]
    row_scale = jnp.full((rows,), score_scale, jnp.float32)
    if fp16_compute:
        q, row_scale = fp16_rows(q, row_scale)
    attend = functools.partial(_attend_block, q=q, head=head, cache_ref=cache_ref,
                               k_scale_ref=k_scale_ref, v_scale_ref=v_scale_ref, layout=layout,
                               block_size=block_size, score_scale=row_scale,
                               packed_dtype=packed_dtype)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return attend, init


def _sparse_attention_kernel(q_ref, topk_ref, token_to_req_ref, positions_ref, block_table_ref,
                             cache_ref, k_scale_ref, v_scale_ref, mask_ref, _prev_ref, out_ref,
                             *lse_ref, layout: str, block_size: int, blocks_per_split: int,
                             score_scale: float, fp16_compute: bool, packed_dtype=None):
    """q_ref: [rows, D] (one token, one KV group); out_ref: [rows, D]; lse_ref: [rows].

    mask_ref: None, or [num_tokens] int32: a token whose entry is 0 is another path's; its
    program exits without a write (_prev_ref, the output it aliases, keeps the row).
    """
    token, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def attend_token():
        num_reqs, max_blocks = block_table_ref.shape
        num_blocks = cache_ref.shape[0]
        position = positions_ref[token]
        req = jnp.clip(token_to_req_ref[token], 0, num_reqs - 1)
        attend, init = block_attender(
            q_ref[...], head, cache_ref, k_scale_ref, v_scale_ref, layout=layout,
            block_size=block_size, score_scale=score_scale, fp16_compute=fp16_compute,
            packed_dtype=packed_dtype)

        # The whole top-k row, read once: which entries repeat an earlier one (they count
        # once: the first occurrence is attended). Padded to a power of two for the vector
        # ops; the padding columns repeat the last entry and come after every real column.
        # Up to 32 columns (M3: 16) the answer is one int32 of bits, so the loop below reads
        # its column with scalar shifts instead of a vector reduction per block.
        topk = topk_ref.shape[-1]
        width = pl.next_power_of_2(topk)
        cols = jnp.arange(width, dtype=jnp.int32)
        first = first_in_row(topk_ref[head, token, jnp.minimum(cols, topk - 1)])
        if width <= 32:
            bits = jnp.sum(jnp.where(first, jnp.left_shift(jnp.int32(1), cols), 0))

            def is_first(column):
                return (jnp.right_shift(bits, jnp.minimum(column, width - 1)) & 1) > 0
        else:
            first = jnp.where(first, 1, 0)

            def is_first(column):
                return jnp.where(cols == column, first, 0).max() > 0

        def body(i, carry):
            carry, attended = carry
            column = split * blocks_per_split + i
            entry = topk_ref[head, token, column]
            valid, block, page = select_pages(
                entry, position, lambda b: block_table_ref[req, b], block_size=block_size,
                max_blocks=max_blocks, num_blocks=num_blocks)
            valid = valid & is_first(column)
            mask = key_mask(valid, block, position, block_size)
            carry = attend(carry, page=page, load_mask=mask, mask=mask[None, :])
            return carry, attended + valid.astype(jnp.int32)

        # A valid entry always holds a key the token attends (its block starts at or before
        # the position): the split attended something when it had one.
        (acc, m, l), attended = lax.fori_loop(0, blocks_per_split, body, (init, jnp.int32(0)))
        out, lse = normalize(acc, m, l, attended > 0)
        out_ref[...] = out.astype(out_ref.dtype)
        if lse_ref:
            lse_ref[0][...] = lse

    if mask_ref is None:
        attend_token()
    else:
        pl.when(mask_ref[token] != 0)(attend_token)


def _merge_splits(out, lse, attended=None):
    """Combine per-split partials: out [S, ...rows, D] f32, lse [S, ...rows] (base 2) as
    `normalize` leaves them: -inf for a split that attended nothing (its out is zeros), NaN for
    a row the split made NaN.

    attended: optional bool [...rows], the rows that attended at least one key (default: those
    with a split whose lse is not -inf). A row that attended nothing gives zeros; a NaN in any
    split of an attended row makes the row NaN.
    """
    nan = jnp.isnan(lse).any(axis=0)
    if attended is None:
        attended = nan | (lse > -jnp.inf).any(axis=0)
    peak = lse.max(axis=0)
    weight = jnp.exp2(lse - jnp.where(jnp.isfinite(peak), peak, 0.0))  # 0 for empty splits
    total = weight.sum(axis=0)
    merged = (weight[..., None] * out).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]
    merged = jnp.where(nan[..., None], jnp.nan, merged)
    return jnp.where(attended[..., None], merged, 0.0)


def _whole(shape):
    """A BlockSpec handing every program the whole array (loads happen at dynamic offsets)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def paged_sparse_attention(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                           token_to_req, token_positions, block_table, k_scale=None,
                           v_scale=None, *, token_mask=None, out=None,
                           num_splits: int | None = None,
                           num_warps: int | None = None,
                           num_stages: int = 2, interpret: bool | None = None,
                           force_packed: bool = False):
    """Launch the kernel over a decode-first (or any) batch; inputs already validated.

    Args:
      query: [num_tokens, num_heads, head_size] bfloat16 / float16.
      kv_cache: the physical cache in spec.kv_cache_layout, the spec's storage dtype.
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding, zeros out).
      block_table: [num_reqs, max_blocks] int32.
      k_scale / v_scale: None, [1] float32 (one scale) or [num_kv_heads, num_blocks *
        block_size] float32 (per slot); FP8 caches only.
      token_mask: optional bool [num_tokens] (traced): the rows this call computes (the
        programs of the others exit at once); None: every row.
      out: optional [num_tokens, num_heads, head_size] in the query dtype: the result keeps its
        rows outside token_mask (written in place with one split); None: those rows are zeros.
        Ignored without token_mask.
      num_splits: splits of each top-k row (a divisor of topk_blocks); default from shapes.
      num_warps / num_stages: Triton launch knobs (num_warps default: 8 for grids of at most
        WIDE_GRID (token, KV head) pairs over a 16-bit cache, else 4).
      interpret: default: interpret everywhere but on a GPU.
      force_packed: hand an FP8 cache to the kernel as uint16 pairs whatever its size (tests;
        caches past 2^31 elements always go that way: see `pages.cache_operand`).
    Returns: [num_tokens, num_heads, head_size] in the query dtype.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, topk = spec.num_kv_heads, spec.topk_blocks
    group = spec.num_queries_per_kv
    rows = group_tile(group)
    splits = num_splits or default_num_splits(num_tokens, num_kv_heads, topk)
    if topk % splits:
        raise ValueError(f"num_splits ({splits}) must divide topk_blocks ({topk})")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    fp8 = jnp.dtype(kv_cache.dtype).itemsize == 1
    if num_warps is None:
        num_warps = 8 if num_tokens * num_kv_heads <= WIDE_GRID and not fp8 else 4

    q = query.reshape(num_tokens, num_kv_heads, group, head_size)
    if rows != group:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    cache, packed_dtype = cache_operand(kv_cache, force_packed=force_packed)
    kernel = functools.partial(
        _sparse_attention_kernel, layout=spec.kv_cache_layout, block_size=spec.block_size,
        blocks_per_split=topk // splits, score_scale=spec.scale * LOG2E, fp16_compute=fp8,
        packed_dtype=packed_dtype)
    row_block = (None, None, rows, head_size)
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, query.dtype)]
        out_specs = [pl.BlockSpec(row_block, lambda t, g, s: (t, g, 0, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, *q.shape), jnp.float32),
                     jax.ShapeDtypeStruct((splits, *q.shape[:-1]), jnp.float32)]
        out_specs = [pl.BlockSpec((None, *row_block), lambda t, g, s: (s, t, g, 0, 0)),
                     pl.BlockSpec((None, None, None, rows), lambda t, g, s: (s, t, g, 0))]
    scale_specs = [None if x is None else _whole(x.shape) for x in (k_scale, v_scale)]
    mask = prev = None
    if token_mask is not None:
        mask = token_mask.astype(jnp.int32)  # the interpreter rejects bool refs
        if out is None:
            out = jnp.zeros(query.shape, query.dtype)
        if splits == 1:  # programs that exit leave the aliased rows as they were
            prev = out.reshape(q.shape[:2] + (group, head_size))
            if rows != group:
                prev = jnp.pad(prev, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    args = (q, topk_indices, token_to_req, token_positions, block_table, cache, k_scale, v_scale,
            mask)
    outs = pl.pallas_call(
        kernel,
        grid=(num_tokens, num_kv_heads, splits),
        in_specs=[pl.BlockSpec(row_block, lambda t, g, s: (t, g, 0, 0)),
                  _whole(topk_indices.shape), _whole(token_to_req.shape),
                  _whole(token_positions.shape), _whole(block_table.shape),
                  _whole(cache.shape), *scale_specs,
                  None if mask is None else _whole(mask.shape),
                  None if prev is None else out_specs[0]],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={} if prev is None else {len(jax.tree.leaves(args)): 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"sparse_attention_{spec.kv_cache_layout}_rows{rows}_splits{splits}",
    )(*args, prev)
    result = outs[0] if splits == 1 else _merge_splits(*outs).astype(query.dtype)
    result = result[:, :, :group].reshape(num_tokens, num_heads, head_size)
    if token_mask is not None and splits > 1:  # unwritten partials: other paths' rows
        result = jnp.where(token_mask[:, None, None], result, out)
    return result
