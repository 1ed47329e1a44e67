"""The Mosaic GPU kernel family (`implementation="mosaic"`): Pallas on Hopper's own instructions.

JAX 0.11 deprecated Pallas' Triton backend (`attention.py`); this is the same operation on
Pallas' Mosaic GPU backend (`jax.experimental.pallas.mosaic_gpu`): the bulk tensor copy engine
(TMA) brings each selected page into shared memory, `wgmma` does both dot products.

Work items are those of the Triton token kernel: one program per (token, KV head, split), the
GQA group's query rows against the split's share of the row's top-k pages, an online softmax
in fp32 (base 2), split-K partials merged by their log2-sum-exp (`attention._merge_splits`).
A mixed decode-first batch is one launch: a token only needs its row of the plan below.

What differs from the Triton kernel:
- A plan computed by XLA before the launch (`plan_pages`): per (KV head, token) row, the pages
  of its valid entries first (`selection.select_rows`), the number of keys the token attends in
  each, and the count. The kernel walks exactly the valid pages, TMA copies of pages read
  from the plan in global memory, a few stages ahead of the compute.
- wgmma needs 64 rows: the group (16 rows at MiniMax-M3's 64/4 and 16/1 heads) is padded to
  64 query rows in shared memory; only the group's rows are read and written.
- A TMA copy moves whole pages. Keys a token may not attend (past its position) are masked out
  of the scores, and their V rows are zeroed in shared memory before P @ V (0 * NaN is NaN).
- FP8 pages are copied as FP8 (half the bytes) and dequantized in registers into a 16-bit
  shared-memory tile (times the per-slot scale of each key; a scalar scale folds into the
  softmax scale and the output), which wgmma then reads.

`prefill_algorithm`: `dispatch.sparse_attention_mosaic` decides; "union" and "auto" (large
prefills) run the union kernel of `mosaic_union.py` and leave the other rows to this one.

Mosaic GPU needs a Hopper GPU (compute capability 9.x: wgmma is sm_90a only) and a JAX whose
`jax.experimental.pallas.mosaic_gpu` imports (it needs absl-py); `mosaic_unavailable_reason()`
says why not. The module imports without either: plgpu is imported when a kernel is built.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from interop import SparseAttentionSpec, check_prefill_algorithm

from .attention import _merge_splits, default_num_splits
from .selection import LOG2E, MASK_VALUE, select_rows
from .validation import check_knobs

WGMMA_ROWS = 64  # wgmma's M: one warpgroup's smallest tile of query rows
TMA_ROWS = 8     # query / output rows move in multiples of the 8-row shared-memory tile
# Pages in flight (the TMA pipeline's depth) that fit in the 227 KB of shared memory per block:
# 16-bit pages are 64 KB (K + V) a slot; FP8 pages 32 KB, plus one 64 KB dequantized K/V tile.
PAGES_IN_FLIGHT_16BIT = 2
PAGES_IN_FLIGHT_FP8 = 3
# Shared memory one block of an H100 may use, and how Mosaic GPU fills it: each buffer
# aligned to 1 KB, 8 bytes a barrier, 2 KB reserved for reductions (CompilerParams'
# reduction_scratch_bytes). H100: a 3-stage 16-bit pipeline with a 16-bit output asked for
# 232504 bytes, exactly this count.
SMEM_BYTES = 227 * 1024
_SMEM_ALIGN, _BARRIER_BYTES, _REDUCTION_BYTES = 1024, 8, 2048
# Lane semantics: every register array's layout is the one the code names (jax 0.11's default,
# Warpgroup, infers them).
SEMANTICS = "Lane"
_GRID = "programs"  # the kernel's one grid axis: (token, KV head, split), split fastest


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """The knobs of implementation="mosaic" (`paged_sparse_attention_mosaic`'s keywords).

      num_splits: splits of each row's valid pages, a divisor of topk_blocks; None: from the
        static shapes (`attention.default_num_splits`).
      pages_in_flight: pages whose TMA copies run ahead of the compute (shared-memory slots
        of K and V); None: the deepest of PAGES_IN_FLIGHT_16BIT / PAGES_IN_FLIGHT_FP8 that
        fits shared memory. (Not Triton's num_stages, which no Mosaic GPU kernel takes.)
    """

    num_splits: int | None = None
    pages_in_flight: int | None = None

    def __post_init__(self):
        check_knobs(self, num_splits=1, pages_in_flight=1)

    @classmethod
    def get_default(cls) -> "MosaicConfig":
        return cls()


def _plgpu():
    """jax.experimental.pallas.mosaic_gpu, imported on first use (it needs absl-py)."""
    from jax.experimental.pallas import mosaic_gpu
    # jax 0.11 looks the pallas_call lowering of Mosaic GPU's CompilerParams up in a registry
    # that only this module fills (jax 0.10 imported it itself).
    from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401
    return mosaic_gpu


def _load(ref, layout):
    """plgpu.load of a whole ref into `layout` (jax 0.10 needs the index argument, jax 0.11
    deprecates it)."""
    plgpu = _plgpu()
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def mosaic_unavailable_reason() -> str | None:
    """None when the Mosaic GPU kernels can run on JAX's default backend here; otherwise a
    sentence saying why not (no GPU, not a Hopper GPU, Mosaic GPU not importable)."""
    try:
        _plgpu()
    except Exception as e:  # noqa: BLE001 - ImportError, or a missing dependency's error
        return (f"jax.experimental.pallas.mosaic_gpu cannot be imported with jax "
                f"{jax.__version__} ({type(e).__name__}: {e})")
    backend = jax.default_backend()
    if backend != "gpu":
        return f"JAX's default backend is {backend!r}, not a GPU"
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None:
        return f"{device.device_kind} reports no CUDA compute capability (not an NVIDIA GPU)"
    if str(capability).split(".")[0] != "9":
        return (f"{device.device_kind} has compute capability {capability}; the kernels use "
                "wgmma, which only Hopper GPUs (compute capability 9.x) have")
    return None


def mosaic_available() -> bool:
    """Whether `implementation="mosaic"` can run on JAX's default backend here."""
    return mosaic_unavailable_reason() is None


def query_rows(num_queries_per_kv: int) -> tuple[int, int]:
    """(rows moved, rows computed): the GQA group padded to the 8-row tile for copies and to
    a multiple of wgmma's 64 rows for the dot products."""
    moved = -(-num_queries_per_kv // TMA_ROWS) * TMA_ROWS
    return moved, -(-moved // WGMMA_ROWS) * WGMMA_ROWS


def scratch_layout(stages: int, *, rows: int, block_size: int, head_size: int, cache_dtype,
                   compute_dtype, out_dtype, per_slot: bool) -> list[tuple]:
    """The kernel's scratch, in the order it unpacks it: ("smem", shape, dtype, swizzled) or
    ("barrier", count) entries (q, K and V pages, output, lse, their barriers; per-slot
    scales and their barriers; the dequantized K and V tiles of an FP8 cache)."""
    page = (stages, block_size, head_size)
    layout = [("smem", (rows, head_size), compute_dtype, True),
              ("smem", page, cache_dtype, True), ("smem", page, cache_dtype, True),
              ("smem", (rows, head_size), out_dtype, True), ("smem", (rows,), jnp.float32, False),
              ("barrier", 1), ("barrier", stages), ("barrier", stages)]
    if per_slot:
        layout += [("smem", (stages, block_size), jnp.float32, False)] * 2
        layout += [("barrier", stages)] * 2
    if jnp.dtype(cache_dtype).itemsize == 1:
        layout += [("smem", (block_size, head_size), compute_dtype, True)] * 2
    return layout


def smem_bytes(layout) -> int:
    """Shared memory Mosaic GPU allocates for a `scratch_layout`."""
    total = _REDUCTION_BYTES
    for entry in layout:
        if entry[0] == "barrier":
            total += _BARRIER_BYTES * entry[1]
        else:
            size = math.prod(entry[1]) * jnp.dtype(entry[2]).itemsize
            total += -(-size // _SMEM_ALIGN) * _SMEM_ALIGN
    return total


def scalar_scales(k_scale, v_scale):
    """[2] float32: the scalar k_scale and v_scale a kernel folds in (1 for none or per-slot
    scales, which a kernel applies per key instead)."""
    scalar = lambda s: (jnp.ones((), jnp.float32) if s is None or jnp.ndim(s) == 2  # noqa: E731
                        else jnp.reshape(s, (-1,))[0])
    return jnp.stack([scalar(k_scale), scalar(v_scale)]).astype(jnp.float32)


def plan_pages(spec: SparseAttentionSpec, topk_indices, token_to_req, token_positions,
               block_table, num_blocks: int):
    """Per (KV head, token) row: the pages to read, valid entries first. XLA, before the launch.

    Args:
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32.
      token_to_req / token_positions: [num_tokens] int32 (position -1: padding).
      block_table: [num_reqs, max_blocks] int32; num_blocks: pages in the cache.
    Returns (pages, num_keys, counts):
      pages: [num_kv_heads, num_tokens, topk] int32, the row's valid entries' pages in row
        order, then page 0 for the rest (never read).
      num_keys: same shape, the keys of each page the token attends (a prefix of the page:
        `selection.key_mask` is `arange(block_size) < num_keys`); 0 past the valid entries.
      counts: [num_kv_heads, num_tokens] int32, valid entries per row.
    """
    num_tokens = token_positions.shape[0]
    num_reqs, max_blocks = block_table.shape
    block_size = spec.block_size
    entries = topk_indices[:, :num_tokens]
    positions = token_positions[None, :, None]
    req = jnp.clip(token_to_req, 0, num_reqs - 1)[None, :, None]
    valid, block, page = select_rows(
        entries, positions, lambda b: block_table[req, b], block_size=block_size,
        max_blocks=max_blocks, num_blocks=num_blocks)
    # key_mask's keys j <= position of the block, counted (a valid block starts at or before
    # the position, so a valid page has at least one key).
    num_keys = jnp.where(valid, jnp.clip(positions - block * block_size + 1, 0, block_size), 0)
    order = jnp.argsort(~valid, axis=-1, stable=True)
    pages = jnp.take_along_axis(page, order, axis=-1)
    num_keys = jnp.take_along_axis(num_keys, order, axis=-1)
    return (pages.astype(jnp.int32), num_keys.astype(jnp.int32),
            valid.sum(axis=-1).astype(jnp.int32))


def _kernel(q_ref, pages_ref, num_keys_ref, counts_ref, cache_ref, scalars_ref, *rest,
            layout: str, num_kv_heads: int, splits: int, stages: int, rows: int, moved: int,
            score_scale: float, per_slot: bool, fp8: bool):
    """One (token, KV head, split) program; refs in global memory unless named *_smem.

    q_ref: [num_tokens, num_kv_heads, moved, D]; pages/num_keys: [G, T, topk]; counts: [G, T];
    scalars_ref: [2] f32 (scalar k_scale, v_scale; 1 for none or per-slot);
    rest: (k_scale, v_scale [G, slots] when per_slot), out [T, G, moved, D] (one split) or
    out [S, T, G, moved, D] f32 + lse [S, T, G, moved] f32, then the scratch (see the launcher).
    """
    plgpu = _plgpu()
    scale_refs, rest = (rest[:2], rest[2:]) if per_slot else ((), rest)
    out_refs, rest = (rest[:1], rest[1:]) if splits == 1 else (rest[:2], rest[2:])
    (q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, *rest) = rest
    if per_slot:
        ks_smem, vs_smem, ks_bar, vs_bar, *rest = rest
    if fp8:
        k16_smem, v16_smem = rest
    block_size, head_size = k_smem.shape[1:]
    cdt = q_smem.dtype

    pid = lax.axis_index(_GRID)
    split = lax.rem(pid, splits)
    head = lax.rem(lax.div(pid, splits), num_kv_heads)
    token = lax.div(pid, splits * num_kv_heads)
    count = counts_ref[head, token]
    # This split's entries: positions split, split + splits, ... of the valid-first row.
    steps = jnp.maximum(lax.div(count - split + splits - 1, splits), 0)

    def page_of(kv: int, page):
        if layout == "NHD":
            return cache_ref.at[page, kv, :, head, :]
        return cache_ref.at[page, kv, head, :, :]

    def issue(step, slot):
        """Start the TMA copies of the step's page (and its per-slot scales) into a slot."""
        page = pages_ref[head, token, step * splits + split]
        plgpu.copy_gmem_to_smem(page_of(0, page), k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(page_of(1, page), v_smem.at[slot], v_bar.at[slot])
        if per_slot:
            slots = pl.ds(page * block_size, block_size)
            plgpu.copy_gmem_to_smem(scale_refs[0].at[head, slots], ks_smem.at[slot],
                                    ks_bar.at[slot])
            plgpu.copy_gmem_to_smem(scale_refs[1].at[head, slots], vs_smem.at[slot],
                                    vs_bar.at[slot])

    for step in range(stages):  # the prologue: the first pages in flight
        pl.when(step < steps)(functools.partial(issue, step, step))

    # The group's rows; the padding rows of the tile are zeros (their outputs are dropped).
    if moved < rows:
        q_smem[...] = plgpu.layout_cast(jnp.zeros((rows, head_size), cdt), plgpu.Layout.WGMMA)
        plgpu.commit_smem()
    plgpu.copy_gmem_to_smem(q_ref.at[token, head], q_smem.at[pl.ds(0, moved)], q_bar)
    plgpu.barrier_wait(q_bar)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    key_cols = plgpu.broadcasted_iota(jnp.int32, (rows, block_size), 1,
                                      layout=plgpu.Layout.WGMMA)
    key_rows = plgpu.broadcasted_iota(jnp.int32, (block_size, head_size), 0,
                                      layout=plgpu.Layout.WGMMA)
    scale = score_scale * scalars_ref[0]

    def tile(page_smem, scale_smem, keys, *, zero_rows: bool):
        """A 16-bit page tile ready for wgmma: FP8 dequantized (times per-slot scales) into
        a scratch tile; the rows past `keys` zeroed (where zero_rows)."""
        if fp8:  # FP8 -> float16 is one instruction a pair; -> bfloat16 goes through f32
            x = _load(page_smem, plgpu.Layout.WGMMA_UPCAST_2X)
            x = plgpu.layout_cast(x.astype(jnp.float16), plgpu.Layout.WGMMA)
        else:
            x = page_smem[...]
        if scale_smem is not None:
            s = _load(scale_smem, row_layout)
            x = x.astype(jnp.float32) * lax.broadcast_in_dim(s, x.shape, [0])
        if x.dtype != cdt:
            x = x.astype(jnp.float32).astype(cdt)
        if zero_rows:
            x = jnp.where(key_rows < keys, x, jnp.zeros_like(x))
        return x

    def store_tile(dst_smem, x):
        dst_smem[...] = x
        plgpu.commit_smem()  # generic-proxy writes, then wgmma (async proxy) reads

    def dequantized(kv: int, slot, keys):
        """The FP8 page's K (kv=0) or V (kv=1) in its 16-bit scratch tile, a wgmma operand."""
        scale_smem = (ks_smem, vs_smem)[kv].at[slot] if per_slot else None
        dst = (k16_smem, v16_smem)[kv]
        store_tile(dst, tile((k_smem, v_smem)[kv].at[slot], scale_smem, keys,
                             zero_rows=kv == 1))
        return dst

    def body(step, carry):
        acc, m, l = carry
        slot = lax.rem(step, stages)
        keys = num_keys_ref[head, token, step * splits + split]
        plgpu.barrier_wait(k_bar.at[slot])
        if per_slot:
            plgpu.barrier_wait(ks_bar.at[slot])
            plgpu.barrier_wait(vs_bar.at[slot])
        k_op = dequantized(0, slot, keys) if fp8 else k_smem.at[slot]

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_op, (1, 0)))
            return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((rows, block_size), jnp.float32))
        scores = jnp.where(key_cols < keys, scores * scale, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        # Masked keys give 0 even when no attended score is above MASK_VALUE (every one -inf:
        # an Inf query), so such a row ends with l = 0 and comes out NaN.
        p = jnp.where(key_cols < keys,
                      jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0])), 0.0)
        l = alpha * l + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        plgpu.barrier_wait(v_bar.at[slot])
        v_op = dequantized(1, slot, keys) if fp8 else v_smem.at[slot]
        if not fp8:  # keys past the position may hold anything: zero their V rows in place
            @pl.when(keys < block_size)
            def _():
                store_tile(v_smem.at[slot], tile(v_smem.at[slot], None, keys, zero_rows=True))

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(cdt), v_op)

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # waits for wgmma: the slot is free
        pl.when(step + stages < steps)(lambda: issue(step + stages, slot))
        return acc, m_new, l

    init = (plgpu.layout_cast(jnp.zeros((rows, head_size), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout))
    acc, m, l = lax.fori_loop(0, steps, body, init)

    # A program that walked no page (its split of the row holds no valid entry) has acc = 0 and
    # l = 0: dividing by l + 1 gives zeros (and lse = MASK_VALUE, weight 0 beside any real
    # split; the merge takes "attended" from the plan). A program that walked one divides by l
    # whatever l holds, as `attention.normalize` does: NaN when a score or an attended value
    # was (a NaN or Inf query, a NaN in an attended slot), 0 when every score was -inf (an Inf
    # query, 0 * inf = NaN): the row comes out NaN, as the reference has it.
    empty = (1 - jnp.minimum(steps, 1)).astype(jnp.float32)  # 1.0: no page walked, else 0.0
    inv = scalars_ref[1] / (l + empty)
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    o_smem[...] = out.astype(o_smem.dtype)
    lse_smem[...] = m + jnp.log2(l + empty)
    plgpu.commit_smem()
    if splits == 1:
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, moved)], out_refs[0].at[token, head])
    else:
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, moved)], out_refs[0].at[split, token, head])
        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, moved)], out_refs[1].at[split, token, head])
    plgpu.wait_smem_to_gmem(0)


def _transforms(dtype):
    """Shared-memory tiling + swizzle of a wgmma operand or TMA tile: 128-byte rows, swizzled
    (FP8 tiles: 64-byte, the layout FP8 -> 16-bit upcasts load from)."""
    plgpu = _plgpu()
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = 64 if itemsize == 1 else 128
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def paged_sparse_attention_mosaic(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                                  token_to_req, token_positions, block_table, k_scale=None,
                                  v_scale=None, *, num_splits: int | None = None,
                                  pages_in_flight: int | None = None):
    """Launch the Mosaic GPU kernel over a decode-first (or any) batch; inputs already
    validated, every array as `attention.paged_sparse_attention` takes it (k_scale / v_scale:
    None, [1] or per slot). Builds the kernel whatever the platform (no availability check:
    `sparse_attention_mosaic` makes it), so it can be lowered for CUDA without a GPU.

    Args:
      num_splits: splits of each row's valid pages (a divisor of topk_blocks); default
        `attention.default_num_splits`.
      pages_in_flight: pages whose copies run ahead of the compute (`MosaicConfig`).
    Returns: [num_tokens, num_heads, head_size] in the query dtype.
    """
    plgpu = _plgpu()
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, topk, block_size = spec.num_kv_heads, spec.topk_blocks, spec.block_size
    group = spec.num_queries_per_kv
    num_blocks = kv_cache.shape[0]
    splits = num_splits or default_num_splits(num_tokens, num_kv_heads, topk)
    if splits < 1 or topk % splits:
        raise ValueError(f"num_splits ({splits}) must be a positive divisor of topk_blocks "
                         f"({topk})")
    fp8 = jnp.dtype(kv_cache.dtype).itemsize == 1
    moved, rows = query_rows(group)
    cdt = query.dtype
    per_slot = k_scale is not None and k_scale.ndim == 2
    out_dtype = cdt if splits == 1 else jnp.float32
    layout = functools.partial(
        scratch_layout, rows=rows, block_size=block_size, head_size=head_size,
        cache_dtype=kv_cache.dtype, compute_dtype=cdt, out_dtype=out_dtype, per_slot=per_slot)
    footprint = lambda n: smem_bytes(layout(n))  # noqa: E731
    MosaicConfig(num_splits, pages_in_flight)  # checks both
    stages = pages_in_flight or (PAGES_IN_FLIGHT_FP8 if fp8 else PAGES_IN_FLIGHT_16BIT)
    if pages_in_flight is None:  # the deepest default pipeline that fits
        while stages > 1 and footprint(stages) > SMEM_BYTES:
            stages -= 1
    if stages < 1 or footprint(stages) > SMEM_BYTES:
        raise ValueError(f"pages_in_flight {stages} needs {footprint(stages)} bytes of shared "
                         f"memory at these shapes; at most {SMEM_BYTES} are available")

    pages, num_keys, counts = plan_pages(spec, topk_indices, token_to_req, token_positions,
                                         block_table, num_blocks)
    q = query.reshape(num_tokens, num_kv_heads, group, head_size)
    if moved != group:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, moved - group), (0, 0)))
    args = [q, pages, num_keys, counts, kv_cache, scalar_scales(k_scale, v_scale)]
    if per_slot:
        args += [k_scale, v_scale]

    scratch = [plgpu.Barrier(num_barriers=entry[1]) if entry[0] == "barrier" else
               plgpu.SMEM(entry[1], entry[2], transforms=_transforms(entry[2]))
               if entry[3] else plgpu.SMEM(entry[1], entry[2])
               for entry in layout(stages)]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, cdt)]
    else:
        out_shape = [jax.ShapeDtypeStruct((splits, *q.shape), jnp.float32),
                     jax.ShapeDtypeStruct((splits, *q.shape[:-1]), jnp.float32)]
    kernel = functools.partial(
        _kernel, layout=spec.kv_cache_layout, num_kv_heads=num_kv_heads, splits=splits,
        stages=stages, rows=rows, moved=moved, score_scale=spec.scale * LOG2E,
        per_slot=per_slot, fp8=fp8)
    # plgpu.kernel, not pl.pallas_call: jax 0.11 lowers Mosaic GPU kernels only this way.
    outs = plgpu.kernel(
        kernel,
        out_type=out_shape,
        scratch_types=scratch,
        grid=(num_tokens * num_kv_heads * splits,),
        grid_names=(_GRID,),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=getattr(plgpu.LoweringSemantics, SEMANTICS)),
        kernel_name=f"sparse_attention_mosaic_{spec.kv_cache_layout}_rows{rows}_splits{splits}",
    )(*args)
    if splits == 1:
        result = outs[0]
    else:  # the rows that attended a key: those with a valid entry in any split
        attended = jnp.broadcast_to((counts > 0).T[:, :, None], outs[1].shape[1:])
        result = _merge_splits(*outs, attended).astype(cdt)
    return result[:, :, :group].reshape(num_tokens, num_heads, head_size)


def sparse_attention_mosaic(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                            token_to_req, token_positions, block_table, k_scale=None,
                            v_scale=None, *, num_decode_tokens, prefill_algorithm: str = "auto",
                            num_splits: int | None = None, pages_in_flight: int | None = None):
    """Attention of a decode-first batch on the Mosaic GPU kernel (`implementation="mosaic"`);
    inputs already validated (as `paged_sparse_attention_mosaic` takes them).

    num_decode_tokens: int32 scalar (traced); decode and prefill rows run the same kernel in
    one launch, so it is not needed. prefill_algorithm: checked ("auto", "token", "union",
    "k2q"); this is the token kernel's path (`dispatch.sparse_attention_mosaic` picks it).
    Raises RuntimeError (at trace time) where Mosaic GPU cannot run: see
    `mosaic_unavailable_reason`.
    """
    del num_decode_tokens
    check_prefill_algorithm(prefill_algorithm)
    reason = mosaic_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f'implementation="mosaic" cannot run here: {reason}. Use '
                           'implementation=None (the platform default) or "pallas"/"xla".')
    return paged_sparse_attention_mosaic(spec, query, kv_cache, topk_indices, token_to_req,
                                         token_positions, block_table, k_scale, v_scale,
                                         num_splits=num_splits,
                                         pages_in_flight=pages_in_flight)
