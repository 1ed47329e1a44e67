"""Union prefill on Pallas Mosaic GPU: a warp-specialised tile kernel over each tile's union.

The Triton-backend union path (`union.py`) on Hopper's own instructions, shaped like JAX's
FlashAttention-3 (`jax/experimental/pallas/ops/gpu/attention_mgpu.py`): one program per
(token tile, KV head), three warpgroups:

- a producer warpgroup (40 registers a thread) walks the tile's union and issues one TMA copy
  of K and one of V per union page into a ring of `stages` shared-memory slots (a 2-D box of
  (block_size, head_size) per page and KV head: strided rows in NHD, contiguous in HND); a
  slot is refilled once both consumers have arrived on its "free" barrier;
- two consumer warpgroups (232 registers) each own 64 of the tile's 128 query rows (tokens x
  GQA group padded to the 8-row tile): `wgmma` for QK^T and PV, the online softmax in
  registers in base 2, the output written straight from shared memory by TMA. Optionally
  (default on) the two consumers alternate on the tensor cores around a shared barrier, as
  FA3 does ("ping-pong"), so one's softmax overlaps the other's matrix products.

The plan is the Triton path's: `union.plan_union` (per (KV head, tile) the distinct valid
(page, block) entries and the bitmask of the tile's tokens that chose each), computed by XLA
before the launch with the shared selection rules, plus three small tables built here:
- `row_table`: per tile and consumer, each query row's token position (-1: a row no token
  of this path owns, padding, or another chunk's token) and its token's bit;
- `entry_keys`: per union entry, the keys at least one of the tile's rows attends (a prefix of
  the page: up to the largest position among the tokens that chose it);
- `owned`: which tokens' rows this launch writes.

Masking: row r attends key j of entry e when its token's bit is set in e's bitmask and the
key's position is at most the token's (`block * block_size + j <= position`); other scores are
-inf (an exact 0 in P). V rows past `entry_keys` (keys no row of the tile attends: they may
hold anything, NaN included) are zeroed in shared memory before PV; a key some row of the tile
attends is multiplied in for every row of the tile, with a zero weight for rows that do not
attend it, exactly as the Triton union kernel does. A row with a NaN / Inf query gives NaN
when it attends a key; a row that attends nothing gives zeros.

Layouts NHD and HND; 16-bit caches (bfloat16, float16) and FP8 caches (e4m3, e5m2) with no
scale or a scalar k_scale / v_scale. An FP8 page is dequantized once per stage, by the
producer: its TMA copies land in a ring of FP8_STAGES FP8 slots, and the producer converts
each page (64 rows at a time) into the 16-bit ring the consumers read, zeroing there the V
rows no row of the tile attends. The consumers see the 16-bit path's ring; a scalar k_scale
folds into the softmax scale and v_scale into the output's normalisation. Per-slot scales do
not fold (each key row has its own) and their rows do not fit shared memory beside both
rings: those layers, and GQA groups whose rows do not fit (more than 64 query heads), are
not taken: `unsupported_reason` says why, and the dispatcher (`dispatch.py`) sends them to
a token kernel.

Output: the kernel writes the rows it owns into the caller's output in place (a JAX `Ref`
aliased in and out of `pl.kernel`), chunk after chunk, so no row outside the mask is copied.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from interop import SparseAttentionSpec
from interop.tiling import union_tile_tokens, union_tokens_per_chunk

from .mosaic import (_BARRIER_BYTES, _SMEM_ALIGN, SEMANTICS, SMEM_BYTES, TMA_ROWS, WGMMA_ROWS,
                     _load, _plgpu, _transforms, scalar_scales)
from .selection import LOG2E, MASK_VALUE
from .union import plan_union

CONSUMERS = 2          # consumer warpgroups, WGMMA_ROWS query rows each
STAGES = 2             # K/V pages in flight: 2 x 64 KB (16-bit) beside 32 KB of queries
MAX_STAGES = 3         # fits beside the queries when no reduction scratch is reserved
MAX_STAGES_FP8 = 2     # beside the FP8 ring
FP8_STAGES = 2         # FP8 pages in flight ahead of the 16-bit ring (FP8 caches only)
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
# FP8: the producer also dequantizes (64 x 128 values a step in registers); the three
# warpgroups share the register file's 512 registers a thread.
CONSUMER_REGISTERS_FP8 = 216
PRODUCER_REGISTERS_FP8 = 80
_TILE, _HEAD, _WG = "tile", "kv_head", "wg"


def tile_geometry(num_queries_per_kv: int) -> tuple[int, int, int]:
    """(tile_tokens, moved, tokens_per_consumer): tokens per tile (`interop.tiling`), a
    token's rows (its GQA group padded to the 8-row tile) and the tokens each consumer
    warpgroup owns (half the tile)."""
    tokens = union_tile_tokens(num_queries_per_kv)
    moved = -(-num_queries_per_kv // TMA_ROWS) * TMA_ROWS
    return tokens, moved, tokens // CONSUMERS


def unsupported_reason(spec: SparseAttentionSpec, cache_dtype, *,
                       per_slot_scales: bool = False) -> str | None:
    """None when the union kernel takes this layer; else why not (the dispatcher then runs
    a token kernel). per_slot_scales: k_scale / v_scale are [num_kv_heads, slots] arrays."""
    if per_slot_scales and jnp.dtype(cache_dtype).itemsize == 1:
        return ("per-slot k_scale / v_scale: the Mosaic union kernel folds scalar scales "
                "only (per-slot scale rows do not fit shared memory beside its two rings)")
    if spec.block_size != 128 or spec.head_size != 128:
        return "the Mosaic union kernel takes block_size 128 and head_size 128"
    tokens, moved, per_consumer = tile_geometry(spec.num_queries_per_kv)
    if per_consumer < 1 or per_consumer * moved > WGMMA_ROWS:
        return (f"a GQA group of {spec.num_queries_per_kv} does not fit a consumer "
                f"warpgroup's {WGMMA_ROWS} rows")
    return None


def smem_bytes(stages: int, *, head_size: int = 128, block_size: int = 128,
               fp8: bool = False) -> int:
    """Shared memory the kernel asks for: the two consumers' query / output rows, the 16-bit
    K and V rings, the row tables, an FP8 cache's FP8 rings (each buffer aligned to 1 KB)
    and the barriers. No reduction scratch is reserved: the kernel only reduces along a
    row, inside each warp."""
    page = block_size * head_size
    buffers = [CONSUMERS * WGMMA_ROWS * head_size * 2, stages * page * 2, stages * page * 2,
               CONSUMERS * 2 * WGMMA_ROWS * 4]
    barriers = 2 * CONSUMERS + 4 * stages + 1
    if fp8:
        buffers += [FP8_STAGES * page, FP8_STAGES * page]
        barriers += 2 * FP8_STAGES
    return (sum(-(-b // _SMEM_ALIGN) * _SMEM_ALIGN for b in buffers)
            + barriers * _BARRIER_BYTES)


def row_table(tile_positions, *, moved: int, per_consumer: int):
    """Per tile and consumer, each of its WGMMA_ROWS query rows: (token position, token bit).

    tile_positions: [num_tiles, tile_tokens] int32, the position of each tile token this
      launch owns, -1 for others (padding, another path's or another chunk's token).
    Returns: [num_tiles, CONSUMERS, 2, WGMMA_ROWS] int32; row r of consumer c is query head
      r % moved of token c * per_consumer + r // moved; rows past per_consumer * moved (and
      the padding rows of a group, which read zero queries and are never written) get the
      token's values or -1 / 0.
    """
    tokens = tile_positions.shape[1]
    r = np.arange(WGMMA_ROWS)
    token = np.arange(CONSUMERS)[:, None] * per_consumer + r[None, :] // moved
    live = (r[None, :] // moved < per_consumer) & (token < tokens)
    token = np.where(live, token, 0)
    position = jnp.where(live[None], tile_positions[:, token], -1)
    bit = jnp.broadcast_to(np.where(live, 1 << token, 0).astype(np.int32), position.shape)
    return jnp.stack([position, bit], axis=2).astype(jnp.int32)


def entry_keys(token_bits, block, tile_positions, *, block_size: int):
    """Per union entry: how many leading keys of its page some row of the tile attends (the
    largest `position - block * block_size + 1` over the tokens that chose it, in [0,
    block_size]); V rows past it are zeroed before PV.

    token_bits / block: [num_kv_heads, num_tiles, E] (a `UnionPlan`'s); tile_positions:
    [num_tiles, tile_tokens] int32 as in `row_table`.
    """
    tokens = tile_positions.shape[1]
    chosen = jnp.right_shift(token_bits[..., None], jnp.arange(tokens, dtype=jnp.int32)) & 1
    keys = tile_positions[None, :, None, :] - block[..., None] * block_size + 1
    return jnp.clip(jnp.where(chosen != 0, keys, 0).max(-1), 0, block_size).astype(jnp.int32)


class ChunkPlan(NamedTuple):
    """What the kernel reads for a chunk of n tokens in tiles of T (`plan_chunk`); E = T *
    topk entries per (KV head, tile).

      size / page / block / token_bits: the `union.UnionPlan` of the owned tokens ([G, tiles]
        and [G, tiles, E] int32), size 0 for a tile left to another path.
      keys: [G, tiles, E] int32, `entry_keys`.
      owned: [n] int32, 1 for the tokens whose rows the kernel writes.
      rows: [tiles, CONSUMERS, 2, WGMMA_ROWS] int32, `row_table`.
      left: [n] bool, tokens of the mask left to another path (their tile's union is larger
        than max_union).
    """

    size: jax.Array
    page: jax.Array
    block: jax.Array
    token_bits: jax.Array
    keys: jax.Array
    owned: jax.Array
    rows: jax.Array
    left: jax.Array


def plan_chunk(topk_indices, token_to_req, token_positions, block_table, token_mask, *,
               num_blocks: int, block_size: int, num_queries_per_kv: int,
               max_union: int | None) -> ChunkPlan:
    """The plan of one chunk of n tokens (XLA, before the launch; jit-able).

    topk_indices: [G, n, topk] int32; token_to_req / token_positions: [n] int32;
    block_table: [num_reqs, max_blocks] int32; token_mask: [n] bool, the rows of this path;
    max_union: tiles whose largest union over the KV heads is larger are left (None: none).
    """
    n = token_positions.shape[0]
    tokens, moved, per_consumer = tile_geometry(num_queries_per_kv)
    num_tiles = -(-n // tokens)
    plan = plan_union(topk_indices, token_to_req, token_positions, block_table,
                      num_blocks=num_blocks, block_size=block_size, tile_tokens=tokens,
                      token_mask=token_mask)
    owned, size = token_mask, plan.size
    left = jnp.zeros((n,), bool)
    if max_union is not None:
        small = plan.size.max(0) <= max_union  # [num_tiles]
        small_token = jnp.repeat(small, tokens)[:n]
        left = owned & ~small_token
        owned = owned & small_token
        size = jnp.where(small[None], size, 0)
    tile_positions = jnp.pad(jnp.where(owned, token_positions, -1),
                             (0, num_tiles * tokens - n), constant_values=-1)
    tile_positions = tile_positions.reshape(num_tiles, tokens).astype(jnp.int32)
    return ChunkPlan(size, plan.page, plan.block, plan.token_bits,
                     entry_keys(plan.token_bits, plan.block, tile_positions,
                                block_size=block_size),
                     owned.astype(jnp.int32),
                     row_table(tile_positions, moved=moved, per_consumer=per_consumer), left)


def _kernel(first_ref, size_ref, page_ref, block_ref, bits_ref, keys_ref, owned_ref, rows_ref,
            scales_ref, q_ref, cache_ref, out_ref, *, layout: str, block_size: int, stages: int,
            tile_tokens: int, moved: int, per_consumer: int, chunk: int, score_scale: float,
            pingpong: bool, programs: int | None, softmax_fence: bool):
    """One program of a chunk of `chunk` tokens starting at first_ref[0]: the (tile, KV head)
    work item at its grid position, or (programs: a persistent grid of that many programs)
    the items program, program + programs, ... (tile-major), the K/V ring running on from
    one item into the next.

    size/page/block/bits/keys: the chunk's plan ([G, tiles(, E)] int32); owned_ref: [chunk]
    int32, the tokens whose rows this launch writes; rows_ref: `row_table`; scales_ref: [2]
    float32, an FP8 cache's scalar k_scale and v_scale (ignored for 16-bit caches); q_ref /
    out_ref: [num_tokens, G, moved, D] (every token; out_ref aliased in and out).
    """
    plgpu = _plgpu()
    head_size = cache_ref.shape[-1]
    cdt = q_ref.dtype
    fp8 = jnp.dtype(cache_ref.dtype).itemsize == 1
    rows = WGMMA_ROWS
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    num_kv_heads, num_tiles = size_ref.shape

    def for_each_item(fn):
        """fn(tile, head, done) -> done + the item's entries, over this program's items;
        done counts the ring's entries before the item (its first slot is done % stages)."""
        if programs is None:
            fn(lax.axis_index(_TILE), lax.axis_index(_HEAD), jnp.int32(0))
            return
        program = lax.axis_index(_TILE)
        count = lax.div(num_tiles * num_kv_heads - program + programs - 1, programs)

        def item(i, done):
            w = program + i * programs
            return fn(lax.div(w, num_kv_heads), lax.rem(w, num_kv_heads), done)

        lax.fori_loop(0, count, item, jnp.int32(0))

    def page_of(kv: int, page, head):
        if layout == "NHD":
            return cache_ref.at[page, kv, :, head, :]
        return cache_ref.at[page, kv, head, :, :]

    def body(qo_smem, k_smem, v_smem, rows_smem, q_bar, rows_bar, k_bar, v_bar, k_free,
             v_free, sched, *fp8_ring):
        wg = lax.axis_index(_WG)
        first = first_ref[0]

        def perform_schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGISTERS_FP8 if fp8 else CONSUMER_REGISTERS,
                                    action="increase")
            q_smem = qo_smem.at[wg]
            key_cols = plgpu.broadcasted_iota(jnp.int32, (rows, block_size), 1,
                                              layout=plgpu.Layout.WGMMA)
            key_rows = plgpu.broadcasted_iota(jnp.int32, (block_size, head_size), 0,
                                              layout=plgpu.Layout.WGMMA)
            # An FP8 cache's scalar k_scale folds into the scores' scale, v_scale into the
            # output's normalisation (the producer dequantizes without them).
            scale = score_scale * scales_ref[0] if fp8 else score_scale
            out_scale = scales_ref[1] if fp8 else 1.0

            def zero_unattended_v(slot, keys):
                """V rows no row of the tile attends may hold anything: zeros (both consumers
                write the same values, each before its own PV). FP8: the producer did it."""
                @pl.when(keys < block_size)
                def _():
                    x = v_smem.at[slot][...]
                    v_smem.at[slot][...] = jnp.where(key_rows < keys, x, jnp.zeros_like(x))
                    plgpu.commit_smem()  # generic-proxy writes, then wgmma reads

            def item(tile, head, done):
                size = size_ref[head, tile]
                base = tile * tile_tokens + wg * per_consumer  # the consumer's first token
                for j in range(per_consumer):
                    # A token past the array reads zeros (TMA's out-of-bounds fill).
                    plgpu.copy_gmem_to_smem(q_ref.at[first + base + j, head],
                                            q_smem.at[pl.ds(j * moved, moved)], q_bar.at[wg])
                plgpu.copy_gmem_to_smem(rows_ref.at[tile, wg], rows_smem.at[wg],
                                        rows_bar.at[wg])
                plgpu.barrier_wait(rows_bar.at[wg])
                position = _load(rows_smem.at[wg, 0], row_layout)
                token_bit = _load(rows_smem.at[wg, 1], row_layout)
                plgpu.barrier_wait(q_bar.at[wg])
                if pingpong:
                    pl.when(wg == 1)(perform_schedule_barrier)

                def step(e, carry):
                    acc, m, l = carry
                    slot = lax.rem(done + e, stages)
                    bits = bits_ref[head, tile, e]
                    block = block_ref[head, tile, e]
                    keys = keys_ref[head, tile, e]
                    # The last key of the page each row attends (-1: none).
                    last = jnp.where((token_bit & bits) != 0, position - block * block_size,
                                     -1)
                    plgpu.barrier_wait(k_bar.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem,
                                    plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        if pingpong:
                            perform_schedule_barrier()
                        return acc_ref[...]

                    scores = pl.run_scoped(qk, plgpu.ACC((rows, block_size), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    attend = key_cols <= lax.broadcast_in_dim(last, scores.shape, [0])
                    scores = jnp.where(attend, scores * scale, -jnp.inf)
                    # m starts finite (MASK_VALUE): a row with nothing attended so far keeps
                    # it and its masked scores give exp2(-inf) = 0.
                    m_new = jnp.maximum(m, scores.max(axis=1))
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
                    l = alpha * l + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p16 = p.astype(cdt)
                    if softmax_fence:  # the softmax stays before the barriers below
                        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    if pingpong:
                        plgpu.barrier_arrive(sched)  # softmax done
                    plgpu.barrier_wait(v_bar.at[slot])
                    if not fp8:
                        zero_unattended_v(slot, keys)
                    if pingpong:
                        plgpu.barrier_wait(sched)  # the tensor cores are ours

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # waits for wgmma
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l

                init = (plgpu.layout_cast(jnp.zeros((rows, head_size), jnp.float32),
                                          plgpu.Layout.WGMMA),
                        plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32),
                                          row_layout),
                        plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout))
                acc, m, l = lax.fori_loop(0, size, step, init)
                if pingpong:
                    pl.when(wg == 0)(perform_schedule_barrier)

                # l == 0: the row attended nothing (zeros, whatever acc holds); NaN l: a NaN
                # row.
                seen = l != 0.0
                inv = out_scale / jnp.where(seen, l, 1.0)
                out = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]),
                                acc * lax.broadcast_in_dim(inv, acc.shape, [0]), 0.0)
                q_smem[...] = out.astype(cdt)  # every wgmma reading the queries completed
                plgpu.commit_smem()
                for j in range(per_consumer):
                    local = base + j
                    owned = (local < chunk) & (owned_ref[jnp.minimum(local, chunk - 1)] != 0)

                    @pl.when(owned)
                    def _store():
                        plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(j * moved, moved)],
                                                out_ref.at[first + local, head])
                # The next item's queries land where this one's outputs leave from.
                plgpu.wait_smem_to_gmem(0)
                return done + size

            for_each_item(item)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGISTERS_FP8 if fp8 else PRODUCER_REGISTERS,
                                    action="decrease")

            def wait_free(free, g, slot):  # the slot's previous page has left both consumers
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))

            def item(tile, head, done):
                size = size_ref[head, tile]

                def fill(e, carry):
                    g = done + e
                    slot = lax.rem(g, stages)
                    page = page_ref[head, tile, e]
                    wait_free(k_free, g, slot)
                    plgpu.copy_gmem_to_smem(page_of(0, page, head), k_smem.at[slot],
                                            k_bar.at[slot])
                    wait_free(v_free, g, slot)
                    plgpu.copy_gmem_to_smem(page_of(1, page, head), v_smem.at[slot],
                                            v_bar.at[slot])
                    return carry

                lax.fori_loop(0, size, dequantize_fill(tile, head, size, done) if fp8
                              else fill, None)
                return done + size

            def dequantize_fill(tile, head, size, done):
                """The FP8 path: pages land in the FP8 ring (FP8_STAGES ahead); each one is
                converted once into the 16-bit ring, its unattended V rows zeroed."""
                k8_smem, v8_smem, k8_bar, v8_bar = fp8_ring
                half_rows = plgpu.broadcasted_iota(jnp.int32, (rows, head_size), 0,
                                                   layout=plgpu.Layout.WGMMA)

                def issue(e):
                    slot8 = lax.rem(e, FP8_STAGES)
                    page = page_ref[head, tile, e]
                    plgpu.copy_gmem_to_smem(page_of(0, page, head), k8_smem.at[slot8],
                                            k8_bar.at[slot8])
                    plgpu.copy_gmem_to_smem(page_of(1, page, head), v8_smem.at[slot8],
                                            v8_bar.at[slot8])

                def dequantize(src, dst, keys):
                    for r0 in range(0, block_size, rows):  # 64 rows at a time (registers)
                        # FP8 -> float16 is one instruction a pair (exact for e4m3 / e5m2,
                        # as is the step on to bfloat16).
                        x = _load(src.at[pl.ds(r0, rows)], plgpu.Layout.WGMMA_UPCAST_2X)
                        x = plgpu.layout_cast(x.astype(jnp.float16), plgpu.Layout.WGMMA)
                        if cdt != jnp.float16:
                            x = x.astype(jnp.float32).astype(cdt)
                        if keys is not None:
                            x = jnp.where(half_rows + r0 < keys, x, jnp.zeros_like(x))
                        dst.at[pl.ds(r0, rows)][...] = x
                    plgpu.commit_smem()  # generic-proxy writes, then wgmma / TMA

                for e in range(FP8_STAGES):
                    pl.when(e < size)(functools.partial(issue, e))

                def convert(e, carry):
                    g = done + e
                    slot, slot8 = lax.rem(g, stages), lax.rem(e, FP8_STAGES)
                    plgpu.barrier_wait(k8_bar.at[slot8])
                    wait_free(k_free, g, slot)
                    dequantize(k8_smem.at[slot8], k_smem.at[slot], None)
                    plgpu.barrier_arrive(k_bar.at[slot])
                    plgpu.barrier_wait(v8_bar.at[slot8])
                    wait_free(v_free, g, slot)
                    dequantize(v8_smem.at[slot8], v_smem.at[slot], keys_ref[head, tile, e])
                    plgpu.barrier_arrive(v_bar.at[slot])
                    pl.when(e + FP8_STAGES < size)(lambda: issue(e + FP8_STAGES))
                    return carry

                return convert

            for_each_item(item)

    page_shape = (stages, block_size, head_size)
    fp8_ring = []
    if fp8:
        page8 = (FP8_STAGES, block_size, head_size)
        fp8_ring = [plgpu.SMEM(page8, cache_ref.dtype, transforms=_transforms(cache_ref.dtype)),
                    plgpu.SMEM(page8, cache_ref.dtype, transforms=_transforms(cache_ref.dtype)),
                    plgpu.Barrier(num_barriers=FP8_STAGES),
                    plgpu.Barrier(num_barriers=FP8_STAGES)]
    pl.run_scoped(
        body,
        plgpu.SMEM((CONSUMERS, rows, head_size), cdt, transforms=_transforms(cdt)),
        plgpu.SMEM(page_shape, cdt, transforms=_transforms(cdt)),
        plgpu.SMEM(page_shape, cdt, transforms=_transforms(cdt)),
        plgpu.SMEM((CONSUMERS, 2, rows), jnp.int32),
        plgpu.Barrier(num_arrivals=per_consumer, num_barriers=CONSUMERS),
        plgpu.Barrier(num_barriers=CONSUMERS),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=CONSUMERS),
        *fp8_ring,
        collective_axes=_WG,
    )


def _launch(kernel, args, *, out, grid, name):
    """Run `kernel` over `grid` with three warpgroups, `out` aliased in and out (a JAX Ref:
    the kernel writes only the rows it owns). plgpu.kernel wraps its body in a custom_vmap
    that does not take Refs, so this calls pl.kernel on a Mosaic GPU mesh itself."""
    plgpu = _plgpu()
    mesh = plgpu.Mesh(grid=grid, grid_names=(_TILE, _HEAD)[:len(grid)],
                      num_threads=CONSUMERS + 1,
                      thread_name=_WG)
    params = plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                                  lowering_semantics=getattr(plgpu.LoweringSemantics, SEMANTICS))
    ref = jax.new_ref(out)
    call = pl.kernel(kernel, out_type=(), mesh=mesh, compiler_params=params, name=name)
    try:  # as plgpu.kernel does: Mosaic GPU kernels run without the vma check
        from jax._src import config
        check_vma = config._check_vma(False)
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        import contextlib
        check_vma = contextlib.nullcontext()
    with check_vma:
        call(*args, ref)
    return jax.freeze(ref)


def paged_sparse_attention_mosaic_union(spec: SparseAttentionSpec, query, kv_cache,
                                        topk_indices, token_to_req, token_positions,
                                        block_table, k_scale=None, v_scale=None, *,
                                        token_mask=None, max_union=None, out=None,
                                        num_stages: int | None = None, pingpong: bool = True,
                                        programs: int | None = None,
                                        softmax_fence: bool = False,
                                        chunk_tokens: int | None = None):
    """Union attention of the rows in token_mask on the Mosaic GPU union kernel; inputs
    already validated (as `attention.paged_sparse_attention` takes them; see
    `unsupported_reason` for what it takes). Builds the kernel whatever the platform (it
    lowers for CUDA without a GPU); running it needs a Hopper GPU.

    Args:
      query: [num_tokens, num_heads, head_size] bfloat16 / float16.
      kv_cache: the physical cache in spec.kv_cache_layout (16-bit or FP8).
      k_scale / v_scale: an FP8 cache's scales: None or a scalar ([1] float32); per-slot
        scales are a ValueError (`unsupported_reason`).
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding, zeros).
      block_table: [num_reqs, max_blocks] int32.
      token_mask: optional bool [num_tokens] (traced): the rows this path computes.
      max_union: a tile whose largest union over the KV heads is larger is left to another
        path (its rows keep `out`'s values and are returned in `left`); None: no limit.
      out: optional [num_tokens, num_heads, head_size] in the query dtype whose rows outside
        the rows computed here are kept (None: zeros).
      num_stages: K/V pages in flight (default STAGES).
      pingpong: the two consumers alternate on the tensor cores (FA3's schedule barrier).
      programs: None (default): one program per (tile, KV head); an int: a persistent grid
        of that many programs (the SM count: one fits an SM) walking the work items, the
        ring running on across items so that one item's first pages arrive while the last
        one computes.
      softmax_fence: an optimization barrier on the softmax's results before the consumer
        says "softmax done" (attention_mgpu.py does this for head_size <= 128, where it
        measured faster: the compiler cannot sink the rescale and the row sums past the
        ping-pong barrier into the other consumer's turn).
      chunk_tokens: tokens per plan and launch (default: `interop.tiling`'s plan budget; a
        smaller value tests the chunk loop).
    Returns: (out, left): out [num_tokens, num_heads, head_size] in the query dtype; left
      bool [num_tokens], the rows of token_mask left to another path.
    """
    per_slot = k_scale is not None and jnp.ndim(k_scale) == 2
    reason = unsupported_reason(spec, kv_cache.dtype, per_slot_scales=per_slot)
    if reason is not None:
        raise ValueError(reason)
    if programs is not None and programs < 1:
        raise ValueError(f"programs ({programs}) must be None or a positive count")
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, topk, group = spec.num_kv_heads, spec.topk_blocks, spec.num_queries_per_kv
    block_size = spec.block_size
    tokens, moved, per_consumer = tile_geometry(group)
    stages = num_stages or STAGES
    fp8 = jnp.dtype(kv_cache.dtype).itemsize == 1
    need = smem_bytes(stages, head_size=head_size, block_size=block_size, fp8=fp8)
    if stages < 1 or need > SMEM_BYTES:
        raise ValueError(f"num_stages {stages} needs {need} bytes of shared memory with a "
                         f"{jnp.dtype(kv_cache.dtype).name} cache; at most {SMEM_BYTES} are "
                         f"available (1 to {MAX_STAGES_FP8 if fp8 else MAX_STAGES})")
    if token_mask is None:
        token_mask = jnp.ones((num_tokens,), bool)
    if out is None:
        out = jnp.zeros(query.shape, query.dtype)
    num_blocks = kv_cache.shape[0]
    n = min(num_tokens, chunk_tokens or union_tokens_per_chunk(num_kv_heads, topk, tokens))
    num_tiles = -(-n // tokens)

    def grouped(x):  # [T, H, D] -> [T, G, moved, D] (a copy only when the group is padded)
        x = x.reshape(num_tokens, num_kv_heads, group, head_size)
        if moved != group:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, moved - group), (0, 0)))
        return x

    q4 = grouped(query)
    kernel = functools.partial(
        _kernel, layout=spec.kv_cache_layout, block_size=block_size, stages=stages,
        tile_tokens=tokens, moved=moved, per_consumer=per_consumer, chunk=n,
        score_scale=spec.scale * LOG2E, pingpong=pingpong, softmax_fence=softmax_fence,
        programs=None if programs is None else min(programs, num_tiles * num_kv_heads))
    grid = (num_tiles, num_kv_heads) if programs is None else (kernel.keywords["programs"],)
    name = (f"sparse_attention_mosaic_union_{spec.kv_cache_layout}_g{group}_s{stages}"
            f"{'_pp' if pingpong else ''}{'_fp8' if fp8 else ''}"
            f"{'' if programs is None else '_persistent'}{'_fence' if softmax_fence else ''}")
    scales = scalar_scales(k_scale, v_scale)

    def run_chunk(i, carry):
        out4, left = carry
        # The last chunk ends at num_tokens (it may overlap the one before: the rows it
        # rewrites get the same values), so every chunk has the static size.
        first = jnp.minimum(i * n, num_tokens - n).astype(jnp.int32)
        take = lambda x, axis=0: lax.dynamic_slice_in_dim(x, first, n, axis)  # noqa: E731
        plan = plan_chunk(take(topk_indices, 1), take(token_to_req), take(token_positions),
                          block_table, take(token_mask), num_blocks=num_blocks,
                          block_size=block_size, num_queries_per_kv=group,
                          max_union=max_union)
        left = lax.dynamic_update_slice_in_dim(left, plan.left, first, 0)
        args = (first[None], plan.size, plan.page, plan.block, plan.token_bits, plan.keys,
                plan.owned, plan.rows, scales, q4, kv_cache)
        out4 = _launch(kernel, args, out=out4, grid=grid, name=name)
        return out4, left

    carry = (grouped(out), jnp.zeros((num_tokens,), bool))
    num_chunks = -(-num_tokens // n)
    if num_chunks == 1:
        out4, left = run_chunk(0, carry)
    else:
        out4, left = lax.fori_loop(0, num_chunks, run_chunk, carry)
    result = out4[:, :, :group].reshape(num_tokens, num_heads, head_size)
    return result, left
