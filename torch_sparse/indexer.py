"""The lightning indexer in PyTorch + Triton (contract, section 6): block scores and top-k
selection fused in one kernel, its split-merge for decode, the index-key cache write, and the
public calls registered with `torch.library`.

Scoring tile. A program takes a tile of consecutive tokens of one request and every index
head (rows = tokens x heads padded to a power of two, at least 16: `interop.tiling.
index_tile_tokens` / `index_tile_rows`), and walks the request's blocks up to the tile's last
visible one: per block it loads the one index-key page (keys past the tile's last token are
never read), takes one `tl.dot` of the tile's queries with it, and reduces each row to the max
over the keys j <= its position (NaN-propagating: a NaN seen makes the block's score NaN).

Fused top-k. No score buffer: every row keeps a running top-k of next_power_of_2(topk) int64
keys in registers, key = priority << 31 | (2^31 - 1 - block) with the 32-bit priority of
`interop.indexer` (forced init > forced local > score > NaN score). Keys are distinct (block
ids are), so "replace the row's smallest key when the new one is larger" keeps exactly the
top keys, and larger key = higher priority, then smaller block: the contract's order and tie
rule with no floating-point ambiguity. Empty slots hold distinct keys below every real one. At
the end a row is sorted by topk_blocks max-extractions and written as block ids (-1 past the
visible blocks).

Splits (decode). A grid of few tiles (decode batches) splits each tile's blocks into
`index_num_splits` ranges (from static shapes: a CUDA graph sees one grid; batch 1 at 32k
tokens: 128 ranges of 2 blocks, one program per SM); each range writes its partial top-k keys
to a workspace, int64 [splits, heads, tokens, index_split_slots] (a range of at most n blocks
keeps next_power_of_2(n) slots when that is fewer than the top-k's: 128 splits x 4 heads x 4
slots = 16 KB per decode token), and `_merge_kernel`, one program per (token, head), extracts
the best topk_blocks of the row from the splits' keys. Prefill grids are large enough to run
unsplit: no workspace at all.

Launches. Decode requests (tiles of their `decode_query_len` tokens) and prefill requests
(tiles of `index_tile_tokens(heads)` tokens) are two launches of the one kernel, their grids
from the metadata's host counts, so nothing syncs with the device. Padding tokens (past
`num_actual_tokens`) get -1 rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from interop import FP8_MAX, QUERY_DTYPES
from interop.indexer import (MAGNITUDE_MASK, PRIORITY_INIT, PRIORITY_LOCAL, PRIORITY_NAN,
                             IndexerSpec)
from interop.tiling import (cdiv, index_num_splits, index_split_slots, index_tile_rows,
                            index_tile_tokens, next_power_of_2)

from .cache import _round_to_fp8_grid
from .ops import _eager_or_op
from .triton_common import INTERPRETED, dot_dtype

NUM_WARPS = 4
NUM_STAGES = 2

_MAGNITUDE = tl.constexpr(MAGNITUDE_MASK)
_PRIO_INIT = tl.constexpr(PRIORITY_INIT)
_PRIO_LOCAL = tl.constexpr(PRIORITY_LOCAL)
_PRIO_NAN = tl.constexpr(PRIORITY_NAN)
_ID_MASK = tl.constexpr(2**31 - 1)      # the key's block field: block ^ _ID_MASK
_EMPTY = tl.constexpr(-(2**62) - 1)     # empty slots: _EMPTY - slot, below every real key
_TAKEN = tl.constexpr(-(2**63))         # extracted keys


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _insert_block(top, q, cache_ptr, row_ptr, b, pos, nvis, first, last, num_blocks,
                  stride_cb, stride_ct, offs_n, offs_d, INIT_BLOCKS: tl.constexpr,
                  LOCAL_BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Score block b for every row (q [rows, D] in DOT_DTYPE, positions pos, visible blocks
    nvis [rows]; first / last: the tile's smallest / largest live position) and insert its key
    into the rows' running top-k `top` [rows, slots] int64.
    DOT_DTYPE: the query dtype compiled (FP8 keys convert to it exactly); float32 under the
    interpreter, whose 16-bit dot would multiply bit patterns."""
    page = tl.load(row_ptr + b).to(tl.int64)
    page_ok = (page >= 0) & (page < num_blocks)
    key_pos = b * BLOCK_SIZE + offs_n
    # Keys past the tile's last token (or of a page outside the cache) are never read.
    k = tl.load(cache_ptr + tl.where(page_ok, page, 0) * stride_cb + offs_n[:, None] * stride_ct
                + offs_d[None, :], mask=(key_pos <= tl.where(page_ok, last, -1))[:, None],
                other=0.0)
    qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)))                              # [rows, bs] f32
    if b * BLOCK_SIZE + BLOCK_SIZE - 1 > first:  # some row sees part of the block only
        qk = tl.where(key_pos[None, :] <= pos[:, None], qk, float("-inf"))
    if INTERPRETED:  # a Python combine function would crawl: flag NaN rows separately
        nan_seen = tl.max((qk != qk).to(tl.int32), axis=1) > 0
        score = tl.where(nan_seen, float("nan"), tl.max(qk, axis=1))
    else:  # one NaN-propagating max (tl.max drops NaN)
        score = tl.reduce(qk, 1, _max_with_nan)
    score = tl.where(page_ok, score, float("nan"))
    bits = score.to(tl.int32, bitcast=True)
    mag = bits & _MAGNITUDE
    prio = tl.where((bits >= 0) | (mag == 0), mag, -1 - mag)
    prio = tl.where(score != score, _PRIO_NAN, prio)
    prio = tl.where(b >= nvis - LOCAL_BLOCKS, _PRIO_LOCAL, prio)
    prio = tl.where(b < INIT_BLOCKS, _PRIO_INIT, prio)
    key = (prio.to(tl.int64) << 31) | (b ^ _ID_MASK).to(tl.int64)
    lowest = tl.min(top, axis=1)
    take = (key > lowest) & (b < nvis)
    return tl.where((top == lowest[:, None]) & take[:, None], key[:, None], top)


@triton.jit
def _sorted_blocks(keys, TOPK: tl.constexpr, SLOTS: tl.constexpr):
    """Block ids [rows, SLOTS] int32 of the TOPK largest keys [rows, n] per row, in
    descending key order; -1 for empty keys and past TOPK."""
    offs = tl.arange(0, SLOTS)
    blocks = tl.full([keys.shape[0], SLOTS], -1, tl.int32)
    for i in tl.static_range(TOPK):
        best = tl.max(keys, axis=1)
        keys = tl.where(keys == best[:, None], _TAKEN, keys)
        block = tl.where(best > _EMPTY, (best & _ID_MASK) ^ _ID_MASK, -1).to(tl.int32)
        blocks = tl.where(offs[None, :] == i, block[:, None], blocks)
    return blocks


@triton.jit
def _index_topk_kernel(q_ptr, cache_ptr, table_ptr, qsl_ptr, pos_ptr, out_ptr, part_ptr,
                       first_req, first_token, max_blocks, num_blocks,
                       stride_qt, stride_qh, stride_cb, stride_ct, stride_tr,
                       stride_oh, stride_ot, stride_ps, stride_ph, stride_pt,
                       HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                       TILE_TOKENS: tl.constexpr, ROWS: tl.constexpr,
                       HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       TOPK: tl.constexpr, SLOTS: tl.constexpr,
                       INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
                       SPLITS: tl.constexpr, SPLIT_BLOCKS: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """Grid (tiles per request, requests, SPLITS): tile program_id(0) of request first_req +
    program_id(1), block range program_id(2). SPLITS == 1: writes the rows' top-k to out
    [heads, tokens, topk] (SLOTS = next_power_of_2(TOPK)); else the partial keys to part
    [SPLITS, heads, tokens - first_token, SLOTS] (SLOTS = `index_split_slots`). SPLIT_BLOCKS: a static bound on a range's blocks (the interpreter's loop).
    INTERPRETED: the Triton interpreter runs the kernel (loop and NaN-max variants)."""
    req = first_req + tl.program_id(1)
    split = tl.program_id(2)
    end = tl.load(qsl_ptr + req + 1)
    start = tl.load(qsl_ptr + req) + tl.program_id(0) * TILE_TOKENS
    if start < end:
        offs_r = tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_SIZE)
        offs_n = tl.arange(0, BLOCK_SIZE)
        offs_k = tl.arange(0, SLOTS)
        token = start + offs_r // HEADS_PAD
        head = offs_r % HEADS_PAD
        live = (token < end) & (head < HEADS) & (offs_r < TILE_TOKENS * HEADS_PAD)
        pos = tl.load(pos_ptr + token, mask=live, other=-1)
        nvis = tl.where(pos >= 0, tl.minimum(pos // BLOCK_SIZE + 1, max_blocks), 0)
        last = tl.max(pos, axis=0)
        first = tl.min(tl.where(live, pos, last), axis=0)
        chunk = tl.cdiv(tl.max(nvis, axis=0), SPLITS)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, tl.max(nvis, axis=0))
        q = tl.load(q_ptr + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=live[:, None], other=0.0).to(DOT_DTYPE)
        top = tl.full([ROWS, SLOTS], _EMPTY, tl.int64) - offs_k[None, :].to(tl.int64)
        row_ptr = table_ptr + req.to(tl.int64) * stride_tr
        if INTERPRETED:
            # The interpreter takes no loop bound from a tensor: a static bound, skipping
            # blocks past the range.
            for i in range(SPLIT_BLOCKS):
                if lo + i < hi:
                    top = _insert_block(top, q, cache_ptr, row_ptr, lo + i, pos, nvis, first, last,
                                        num_blocks, stride_cb, stride_ct, offs_n, offs_d,
                                        INIT_BLOCKS, LOCAL_BLOCKS, BLOCK_SIZE, DOT_DTYPE,
                                        INTERPRETED)
        else:
            # Compiled: the loop runs over the range only, so its page loads pipeline.
            for b in range(lo, hi):
                top = _insert_block(top, q, cache_ptr, row_ptr, b, pos, nvis, first, last,
                                    num_blocks, stride_cb, stride_ct, offs_n, offs_d,
                                    INIT_BLOCKS, LOCAL_BLOCKS, BLOCK_SIZE, DOT_DTYPE,
                                    INTERPRETED)
        if SPLITS == 1:
            tl.store(out_ptr + head[:, None] * stride_oh + token.to(tl.int64)[:, None] * stride_ot
                     + offs_k[None, :], _sorted_blocks(top, TOPK, SLOTS),
                     mask=live[:, None] & (offs_k[None, :] < TOPK))
        else:
            tl.store(part_ptr + split * stride_ps + head[:, None] * stride_ph
                     + (token - first_token).to(tl.int64)[:, None] * stride_pt + offs_k[None, :],
                     top, mask=live[:, None])


@triton.jit
def _merge_kernel(part_ptr, out_ptr, first_token, stride_ps, stride_ph, stride_pt,
                  stride_oh, stride_ot, SPLITS: tl.constexpr, PART_SLOTS: tl.constexpr,
                  TOPK: tl.constexpr, SLOTS: tl.constexpr):
    """Grid (tokens, heads): the top-k of token first_token + program_id(0), head
    program_id(1), from the SPLITS partial top-ks in part [SPLITS, heads, tokens, PART_SLOTS]."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_c = tl.arange(0, SPLITS * PART_SLOTS)
    keys = tl.load(part_ptr + h * stride_ph + t * stride_pt
                   + (offs_c // PART_SLOTS) * stride_ps + offs_c % PART_SLOTS)
    offs_k = tl.arange(0, SLOTS)
    tl.store(out_ptr + h * stride_oh + (first_token + t) * stride_ot + offs_k[None, :],
             _sorted_blocks(keys[None, :], TOPK, SLOTS), mask=offs_k[None, :] < TOPK)


def _launch_requests(query, cache, block_table, query_start_loc, token_positions, out, *,
                     first_req: int, num_reqs: int, tiles_per_req: int, tile_tokens: int,
                     first_token: int, num_tokens: int, topk: int, init_blocks: int,
                     local_blocks: int, num_warps: int, num_stages: int) -> None:
    """Score and select the tokens [first_token, first_token + num_tokens) of requests
    [first_req, first_req + num_reqs), tiles of tile_tokens tokens."""
    heads = query.shape[1]
    num_blocks, block_size, head_size = cache.shape
    max_blocks = block_table.shape[1]
    slots = next_power_of_2(topk)
    splits = index_num_splits(num_reqs * tiles_per_req, max_blocks)
    part_slots = index_split_slots(topk, max_blocks, splits)
    part = out
    if splits > 1:  # the workspace: partial keys of every split (module docstring)
        part = torch.empty((splits, heads, num_tokens, part_slots), dtype=torch.int64,
                           device=query.device)
    _index_topk_kernel[(tiles_per_req, num_reqs, splits)](
        query, cache, block_table, query_start_loc, token_positions, out, part,
        first_req, first_token, max_blocks, num_blocks,
        query.stride(0), query.stride(1), cache.stride(0), cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        HEADS=heads, HEADS_PAD=next_power_of_2(heads), TILE_TOKENS=tile_tokens,
        ROWS=index_tile_rows(heads, tile_tokens), HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        TOPK=topk, SLOTS=part_slots, INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
        SPLITS=splits, SPLIT_BLOCKS=1 if not INTERPRETED else cdiv(max_blocks, splits),
        DOT_DTYPE=dot_dtype(query.dtype, False),
        INTERPRETED=INTERPRETED, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_kernel[(num_tokens, heads)](
            part, out, first_token, part.stride(0), part.stride(1), part.stride(2),
            out.stride(0), out.stride(1), SPLITS=splits, PART_SLOTS=part_slots, TOPK=topk,
            SLOTS=slots, num_warps=NUM_WARPS)


def launch_index_topk(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                      query_start_loc: torch.Tensor, token_positions: torch.Tensor,
                      out: torch.Tensor, *, topk: int, init_blocks: int, local_blocks: int,
                      num_decodes: int, decode_query_len: int, num_prefills: int,
                      max_prefill_query_len: int, num_actual_tokens: int,
                      num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> None:
    """The indexer over a decode-first batch; writes out [heads, >= num_tokens, topk] int32.

    query: [num_tokens, heads, head_size] bf16/fp16; cache: (num_blocks, block_size,
    head_size) bf16/fp16/fp8 (unit stride on the last axis); block_table: [num_reqs,
    max_blocks]; query_start_loc: [num_reqs + 1]; token_positions: [>= num_tokens] (-1:
    padding). The counts are the metadata's (host ints). Inputs are validated by the caller.
    """
    num_tokens = query.shape[0]
    if num_actual_tokens < num_tokens:
        out[:, num_actual_tokens:num_tokens].fill_(-1)
    heads = query.shape[1]
    common = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                  num_warps=num_warps, num_stages=num_stages)
    args = (query, cache, block_table, query_start_loc, token_positions, out)
    num_decode_tokens = num_decodes * decode_query_len
    if num_decodes:
        tokens = index_tile_tokens(heads, decode_query_len)
        _launch_requests(*args, first_req=0, num_reqs=num_decodes,
                         tiles_per_req=cdiv(decode_query_len, tokens), tile_tokens=tokens,
                         first_token=0, num_tokens=num_decode_tokens, **common)
    if num_prefills and max_prefill_query_len:
        tokens = index_tile_tokens(heads)
        _launch_requests(*args, first_req=num_decodes, num_reqs=num_prefills,
                         tiles_per_req=cdiv(max_prefill_query_len, tokens), tile_tokens=tokens,
                         first_token=num_decode_tokens,
                         num_tokens=num_actual_tokens - num_decode_tokens, **common)


# ---------------------------------------------------------------- the index-key cache write

@triton.jit
def _write_index_k_kernel(key_ptr, slot_ptr, cache_ptr, num_slots, stride_kt, stride_cb,
                          stride_ct, fp8_max, HEAD_SIZE: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, IS_FP8: tl.constexpr,
                          INTERPRETED: tl.constexpr, MANTISSA_BITS: tl.constexpr,
                          MIN_EXPONENT: tl.constexpr):
    """Grid (num_tokens,): token program_id(0)'s key at its slot; a negative slot or one
    past the cache writes nothing."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots)
    slot = tl.where(live, slot, 0)
    offs_d = tl.arange(0, HEAD_SIZE)
    mask = offs_d < tl.where(live, HEAD_SIZE, 0)  # one comparison: a bool mask
    key = tl.load(key_ptr + t * stride_kt + offs_d, mask=mask, other=0.0)
    if IS_FP8:
        key = tl.clamp(key.to(tl.float32), -fp8_max, fp8_max)
        if INTERPRETED:
            key = _round_to_fp8_grid(key, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
             + offs_d, key.to(cache_ptr.dtype.element_ty), mask=mask)


def launch_write_index_k(cache: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                         fp8_max: float) -> None:
    """key [num_tokens, head_size] into cache (num_blocks, block_size, head_size) at
    slot_mapping [num_tokens]; fp8_max > 0 marks an FP8 cache (saturating)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_blocks, block_size, head_size = cache.shape
    finfo = torch.finfo(cache.dtype)
    _write_index_k_kernel[(num_tokens,)](
        key, slot_mapping, cache, num_blocks * block_size, key.stride(0), cache.stride(0),
        cache.stride(1), fp8_max, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        IS_FP8=fp8_max > 0, INTERPRETED=INTERPRETED,
        MANTISSA_BITS=round(-math.log2(finfo.eps)), MIN_EXPONENT=round(math.log2(finfo.tiny)),
        num_warps=1)


# ---------------------------------------------------------------- torch.library ops

def _index_topk(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                query_start_loc: torch.Tensor, token_positions: torch.Tensor, out: torch.Tensor,
                topk: int, init_blocks: int, local_blocks: int, num_decodes: int,
                decode_query_len: int, num_prefills: int, max_prefill_query_len: int,
                num_actual_tokens: int) -> None:
    """The indexer's top-k of query [num_tokens, heads, head_size] into out (see
    `launch_index_topk`)."""
    launch_index_topk(query, cache, block_table, query_start_loc, token_positions, out,
                      topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                      num_decodes=num_decodes, decode_query_len=decode_query_len,
                      num_prefills=num_prefills, max_prefill_query_len=max_prefill_query_len,
                      num_actual_tokens=num_actual_tokens)


def _write_index_k(cache: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                   fp8_max: float) -> None:
    """key [num_tokens, head_size] into the index cache at slot_mapping [num_tokens]."""
    launch_write_index_k(cache, key, slot_mapping, fp8_max)


index_topk_op = torch.library.custom_op("minimax_m3_sparse::index_topk", _index_topk,
                                        mutates_args=("out",))
write_index_k_op = torch.library.custom_op("minimax_m3_sparse::write_index_k", _write_index_k,
                                           mutates_args=("cache",))
call_index_topk = _eager_or_op(index_topk_op, _index_topk)
call_write_index_k = _eager_or_op(write_index_k_op, _write_index_k)


# The ops only write into their arguments: tracing them needs no computation.
@index_topk_op.register_fake
def _(query, cache, block_table, query_start_loc, token_positions, out, topk, init_blocks,
      local_blocks, num_decodes, decode_query_len, num_prefills, max_prefill_query_len,
      num_actual_tokens) -> None:
    return None


@write_index_k_op.register_fake
def _(cache, key, slot_mapping, fp8_max) -> None:
    return None


# ---------------------------------------------------------------- the public calls

_QUERY_DTYPES = tuple(getattr(torch, name) for name in QUERY_DTYPES)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_runnable(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the indexer's Triton kernels run on CUDA tensors (or on any device "
                         f"under TRITON_INTERPRET=1), got tensors on {device}")


def _check_tensor(name: str, x, device, dtypes=None, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        bridge = " (convert it with interop.to_torch)" if hasattr(x, "__jax_array__") or \
            type(x).__module__.startswith("jax") else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{bridge}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {list(dtypes)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the index query is on {device}")
    if x.dim() and x.shape[-1] > 1 and x.dtype.is_floating_point and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last axis (strides {x.stride()})")


def _check_cache(ispec: IndexerSpec, index_cache, data: torch.Tensor, name: str) -> int:
    """The index cache against the spec and the query/key dtype; returns num_blocks."""
    _check_tensor("index_cache", index_cache, data.device)
    expected = getattr(torch, ispec.cache_storage_dtype(str(data.dtype).replace("torch.", "")))
    if index_cache.dtype != expected:
        raise TypeError(f"index_cache has dtype {index_cache.dtype} but index_cache_dtype "
                        f"{ispec.index_cache_dtype!r} with {data.dtype} {name} stores {expected}")
    return ispec.check_index_cache_shape(index_cache.shape)


def index_topk(ispec: IndexerSpec, index_query, index_cache, metadata, out=None) -> torch.Tensor:
    """The indexer's block selection for a decode-first batch (contract, section 6).

    index_query: [num_tokens, num_index_heads, index_head_size] bf16/fp16; index_cache:
    (num_blocks, block_size, index_head_size) in the spec's storage dtype; metadata: the
    PyTorch flavour (`interop.to_torch(build_metadata(...), device)`): its block_table,
    query_start_loc, token_positions (device) and counts (host ints) are read. out: None or
    int32 [num_index_heads, >= num_tokens, topk_blocks] (rows [:num_tokens] are written; a
    stable buffer for CUDA graphs). Returns out[:, :num_tokens]: per row the min(topk_blocks,
    visible blocks) highest-priority blocks in descending priority (equal priority: smaller
    block first), then -1; padding tokens all -1. No host sync: capturable in a CUDA graph,
    and opaque (a registered op) under torch.compile.
    """
    if not isinstance(ispec, IndexerSpec):
        raise TypeError(f"ispec must be an interop.IndexerSpec, got {type(ispec).__name__}")
    _check_tensor("index_query", index_query, None, _QUERY_DTYPES)
    device = index_query.device
    _check_runnable(device)
    _check_cache(ispec, index_cache, index_query, "index_query")
    num_tokens = ispec.check_index_query_shape(index_query.shape)
    _check_tensor("metadata.block_table", metadata.block_table, device, _INDEX_DTYPES, 2)
    num_reqs = metadata.block_table.shape[0]
    for name, length in (("query_start_loc", num_reqs + 1), ("token_positions", num_tokens)):
        x = getattr(metadata, name)
        _check_tensor(f"metadata.{name}", x, device, _INDEX_DTYPES, 1)
        if x.shape[0] < length:
            raise ValueError(f"metadata.{name} has {x.shape[0]} entries: expected >= {length}")
    counts = {f: int(getattr(metadata, f)) for f in (
        "num_decodes", "num_prefills", "decode_query_len", "max_prefill_query_len",
        "num_actual_tokens")}
    if counts["num_actual_tokens"] > num_tokens:
        raise ValueError(f"metadata.num_actual_tokens ({counts['num_actual_tokens']}) exceeds "
                         f"index_query's {num_tokens} tokens")
    if counts["num_decodes"] + counts["num_prefills"] != num_reqs:
        raise ValueError(f"metadata.num_decodes + num_prefills ({counts['num_decodes']} + "
                         f"{counts['num_prefills']}) != {num_reqs} block-table rows")
    if out is None:
        out = torch.empty(ispec.topk_shape(num_tokens), dtype=torch.int32, device=device)
    _check_tensor("out", out, device, (torch.int32,), 3)
    if (out.shape[0] != ispec.num_index_heads or out.shape[1] < num_tokens
            or out.shape[2] != ispec.topk_blocks or out.stride(2) != 1):
        raise ValueError(f"out shape {tuple(out.shape)} (strides {out.stride()}) does not "
                         f"match: expected [{ispec.num_index_heads}, >= {num_tokens}, "
                         f"{ispec.topk_blocks}] with a unit last stride")
    call_index_topk(index_query, index_cache, metadata.block_table, metadata.query_start_loc,
                    metadata.token_positions, out, ispec.topk_blocks, ispec.init_blocks,
                    ispec.local_blocks, counts["num_decodes"], counts["decode_query_len"],
                    counts["num_prefills"], counts["max_prefill_query_len"],
                    counts["num_actual_tokens"])
    return out[:, :num_tokens]


def write_index_k(index_cache, index_key, slot_mapping, ispec: IndexerSpec) -> None:
    """Write each token's index key into the index cache in place.

    index_cache: (num_blocks, block_size, index_head_size) in the spec's storage dtype for the
    key dtype; index_key: [num_tokens, index_head_size] bf16/fp16; slot_mapping: [>= num_tokens]
    int (the KV cache's slots: page * block_size + offset); a negative slot is skipped, one
    past the cache never written. FP8 caches store the key saturated to the format's largest
    finite value (no scale: the indexer only orders scores).
    """
    if not isinstance(ispec, IndexerSpec):
        raise TypeError(f"ispec must be an interop.IndexerSpec, got {type(ispec).__name__}")
    _check_tensor("index_key", index_key, None, _QUERY_DTYPES)
    _check_runnable(index_key.device)
    _check_cache(ispec, index_cache, index_key, "index_key")
    num_tokens = ispec.check_index_key_shape(index_key.shape)
    _check_tensor("slot_mapping", slot_mapping, index_key.device, _INDEX_DTYPES, 1)
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but index_key has "
                         f"{num_tokens} tokens")
    fp8_max = FP8_MAX.get(str(index_cache.dtype).replace("torch.", ""), 0.0)
    call_write_index_k(index_cache, index_key, slot_mapping[:num_tokens], fp8_max)
