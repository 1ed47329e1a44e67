"""Triton helpers shared by the kernel families (`attention.py`, `union.py`, `k2q.py`,
`cache.py`): the entry rule's Triton half (the PyTorch half is `selection.py`), the
online-softmax step over one selected block, the rows' finish with the garbage-in rules
(contract 5), FP8 query scaling, the launch-side dtype and scale arguments, and the check
every family's knob dataclass (`TokenKernelConfig`, `UnionConfig`, `K2QConfig`,
`WriteKVConfig`) runs on its fields.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Whether the kernels run in Triton's interpreter: Triton reads TRITON_INTERPRET when it
# defines a kernel, so this is fixed when torch_sparse is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_knob(config, name: str, optional: bool = False) -> None:
    """A knob dataclass's field `name` is an int >= 1 (None too when optional): a TypeError
    for another type, a ValueError for a smaller value."""
    value = getattr(config, name)
    owner = type(config).__name__
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}.{name} must be >= 1, got {value}")


def dot_dtype(query_dtype: torch.dtype, fp8_cache: bool):
    """The `tl.dot` operand dtype: the query's (float16 over an FP8 cache); float32 under the
    interpreter, whose 16-bit float dot would multiply bit patterns."""
    if INTERPRETED:
        return tl.float32
    return tl.float16 if fp8_cache else TL_DTYPES[query_dtype]


@triton.jit
def visible_blocks(req, pos, num_reqs, max_blocks, BLOCK_SIZE: tl.constexpr):
    """(request row, blocks the token may see in it): a token is live when pos >= 0 and
    0 <= req < num_reqs; a dead token sees no block (and reads row 0)."""
    live = (pos >= 0) & (req >= 0) & (req < num_reqs)
    limit = tl.minimum(tl.where(live, pos // BLOCK_SIZE + 1, 0), max_blocks)
    return tl.where(live, req, 0).to(tl.int64), limit


@triton.jit
def entry_page(block, limit, req, block_table_ptr, stride_bt, num_blocks):
    """(valid, block, page) of a top-k entry: valid when 0 <= block < limit and the page the
    block table gives lies inside the cache; block and page are 0 where invalid (the table is
    read only for an entry inside the row)."""
    valid = (block >= 0) & (block < limit)
    block = tl.where(valid, block, 0)
    page = tl.load(block_table_ptr + req * stride_bt + block, mask=valid, other=0)
    valid = valid & (page >= 0) & (page < num_blocks)
    return valid, block, tl.where(valid, page, 0)


@triton.jit
def repeated_entries(row, offs):
    """bool [TOPK_PAD]: entry k of a top-k row (values `row`, column indices `offs`, both
    [TOPK_PAD]) equals an entry before it. A [TOPK_PAD, TOPK_PAD] compare and one reduction.
    Validity depends on an entry's value only, so a repeat is valid exactly when its first
    occurrence is: dropping repeats keeps one copy of every valid block (contract 5)."""
    same = (row[:, None] == row[None, :]) & (offs[None, :] < offs[:, None])
    return tl.max(tl.where(same, 1, 0), 1) > 0


@triton.jit
def finish_rows(acc, l_i, seen):
    """(output rows, l) from the online-softmax state: acc / l where the row attended a key
    (`seen`), zeros where it attended none. `seen` is tracked apart from l (contract 5): a
    non-finite query row that attends a key has NaN scores (or +-inf ones) at its keys, so l is
    NaN (inf - inf) or 0 (every score -inf), and `l > 0` would read either as "nothing
    attended". A row that attended keys with l = 0 met only non-finite inputs: its l becomes
    NaN, so the row is NaN (as 0 / 0 in the reference), and so is a split's log-sum-exp."""
    l_i = tl.where(l_i == 0.0, float("nan"), l_i)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    return tl.where(seen[:, None], out, 0.0), l_i


@triton.jit
def fp16_rows(q, qk_scale):
    """FP8 caches compute in float16: scale each query row by (about) a power of two so its
    largest magnitude lies near 2^14 (no overflow; bfloat16's 8 significant bits fit in
    float16's 11). Returns (float16 rows, per-row score scale qk_scale / row scale)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), 1)
    shift = 14.0 - tl.floor(tl.log2(tl.where(amax > 0, amax, 16384.0)))  # zero row: 0
    q_scale = tl.exp2(tl.minimum(tl.maximum(shift, -120.0), 100.0))
    return (qf * q_scale[:, None]).to(tl.float16), qk_scale / q_scale


@triton.jit
def fp8_rows(q, qk_scale):
    """The FP8 tensor-core path (`UnionConfig.fp8_dot`): scale each query row by a power of
    two so its largest magnitude lies in (224, 448] (e4m3's largest finite value is 448) and
    round it to e4m3. Returns (e4m3 rows, per-row score scale qk_scale / row scale); a row
    holding a NaN or an Inf gets a NaN score scale (e4m3 has no Inf and conversion saturates,
    so the row would otherwise turn finite)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), 1)
    finite = amax < float("inf")
    shift = tl.floor(tl.log2(448.0 / tl.where(finite & (amax > 0), amax, 448.0)))
    q_scale = tl.exp2(tl.minimum(tl.maximum(shift, -120.0), 100.0))
    row_scale = tl.where(finite, qk_scale / q_scale, float("nan"))
    return (qf * q_scale[:, None]).to(tl.float8e4nv), row_scale


@triton.jit
def attend_block(acc, m_i, l_i, q, kv_ptr, k_scale_ptr, v_scale_ptr, page, load_mask,
                 score_mask, offs_n, offs_d, stride_tok, stride_kv, ks_slot, vs_slot, qk_scale,
                 BLOCK_SIZE: tl.constexpr, HAS_K_SCALE: tl.constexpr,
                 HAS_V_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) [rows, ...] with one selected block.

    kv_ptr points at K[page, :, kv_head, :] (V is `stride_kv` further); the scale pointers at
    the KV head's row. load_mask [BLOCK_SIZE]: the keys any row attends (no other key is
    read); score_mask [1 or rows, BLOCK_SIZE]: the keys each row attends (inside load_mask).
    q is in the compute dtype (the query's; float16 for an FP8 cache) and qk_scale is one
    factor per row. DOT_DTYPE is q's dtype when compiled; float32 under the interpreter, whose
    16-bit float dot would multiply bit patterns (operands are rounded to q's dtype first).
    An e4m3 q (the FP8 tensor-core path, `fp8_rows`; the cache is e4m3) takes K and V as
    stored and rounds p to e4m3 for `p @ v`, with p scaled by 2^8 (l too, so acc / l is
    unchanged) so that probabilities down to 2^-17 survive e4m3's smallest subnormal, 2^-9.
    Keys outside load_mask read as 0, so a slot no row attends never shows. Where rows attend
    different loaded keys (a union tile), a non-finite V value of a key one row attends also
    reaches the tile's other rows (p = 0 times NaN): README, "Bad input". Scrubbing V of
    non-finite values here cost the union kernel 1.75x on the H200 (64/4, 16k rho0.87: 123
    against 212 TFLOP/s), so it is not done.
    """
    tile = offs_n[:, None].to(tl.int64) * stride_tok + offs_d[None, :]
    # FP8 values are exact in float16 (one conversion instruction per pair; to bfloat16 takes
    # several): dequantize by conversion, scale in fp32.
    k = tl.load(kv_ptr + tile, mask=load_mask[:, None], other=0.0).to(q.dtype)
    v = tl.load(kv_ptr + stride_kv + tile, mask=load_mask[:, None], other=0.0).to(q.dtype)
    scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE))) * qk_scale[:, None]
    slot = page.to(tl.int64) * BLOCK_SIZE + offs_n
    if HAS_K_SCALE:
        scores *= tl.load(k_scale_ptr + slot * ks_slot, mask=load_mask, other=0.0)[None, :]
    scores = tl.where(score_mask, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    m_shift = m_safe
    if q.dtype.is_fp8():
        m_shift = m_safe - 8.0  # p and l carry 2^8; alpha does not
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_V_SCALE:
        p *= tl.load(v_scale_ptr + slot * vs_slot, mask=load_mask, other=0.0)[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE))
    return acc, m_new, l_i


def scale_args(scale: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, head stride, slot stride): a scalar reads one element for every slot."""
    if scale is None:
        return fallback, 0, 0
    if scale.dim() == 2:
        return scale, scale.stride(0), scale.stride(1)
    return scale, 0, 0
