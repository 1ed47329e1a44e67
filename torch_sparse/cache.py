"""Writing new K/V into the paged cache: the Triton kernel and its launcher.

A program stores one token's K and V for every KV head at its slot (page * block_size +
offset); a negative slot, or one outside the cache, writes nothing. FP8 caches receive
`value / scale`, saturated to the format's largest finite value.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRETED, check_knob, scale_args

NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class WriteKVConfig:
    """The K/V write kernel's launch knob, in the spirit of JAX's `BlockSizes`: num_warps."""

    num_warps: int = NUM_WARPS

    def __post_init__(self):
        check_knob(self, "num_warps")

    @classmethod
    def get_default(cls) -> "WriteKVConfig":
        return cls(num_warps=NUM_WARPS)


@triton.jit
def _round_to_fp8_grid(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """Round fp32 `x` (already inside the FP8 range) to the nearest FP8 value, ties to even,
    in fp32 arithmetic. Only the interpreter needs this: its fp32 -> fp8 cast drops the carry
    when rounding up crosses a power of two (1.97 -> 1.0), while the GPU's cast is exact."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, MIN_EXPONENT)  # subnormals share the smallest step
    step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    # Adding and removing 1.5 * 2^23 rounds |x / step| < 2^22 to an integer, ties to even.
    return ((x / step + 12582912.0) - 12582912.0) * step


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, slot_ptr, cache_ptr, k_scale_ptr, v_scale_ptr,
                     num_slots,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_blk, stride_kv, stride_tok, stride_head,
                     ks_head, ks_slot, vs_head, vs_slot, fp8_max,
                     NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     IS_FP8: tl.constexpr, HAS_K_SCALE: tl.constexpr,
                     HAS_V_SCALE: tl.constexpr, INTERPRETED: tl.constexpr,
                     MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """Grid (num_tokens,). MANTISSA_BITS / MIN_EXPONENT describe the FP8 format."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots)
    slot = tl.where(live, slot, 0)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_SIZE)
    # One comparison (the interpreter turns a scalar & vector of bools into ints).
    mask = (offs_h < tl.where(live, NUM_KV_HEADS, 0))[:, None]
    key = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                  mask=mask, other=0.0)
    value = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=mask, other=0.0)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_blk + (slot % BLOCK_SIZE) * stride_tok
           + offs_h[:, None] * stride_head + offs_d[None, :])
    if IS_FP8:
        key = key.to(tl.float32)
        value = value.to(tl.float32)
        if HAS_K_SCALE:
            key /= tl.load(k_scale_ptr + offs_h * ks_head + slot * ks_slot,
                           mask=offs_h < NUM_KV_HEADS, other=1.0)[:, None]
        if HAS_V_SCALE:
            value /= tl.load(v_scale_ptr + offs_h * vs_head + slot * vs_slot,
                             mask=offs_h < NUM_KV_HEADS, other=1.0)[:, None]
        key = tl.clamp(key, -fp8_max, fp8_max)
        value = tl.clamp(value, -fp8_max, fp8_max)
        if INTERPRETED:
            key = _round_to_fp8_grid(key, MANTISSA_BITS, MIN_EXPONENT)
            value = _round_to_fp8_grid(value, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(dst, key.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, value.to(cache_ptr.dtype.element_ty), mask=mask)


def launch_write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor, *, fp8_max: float = 0.0,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    config: WriteKVConfig | None = None) -> None:
    """Write key / value ([num_tokens, num_kv_heads, head_size]) at slot_mapping ([num_tokens]).

    kv_cache: the logical view (any strides, unit head stride); fp8_max > 0 marks an FP8 cache
    (scales apply only then); config: the launch knob (None: `WriteKVConfig.get_default()`).
    Inputs are validated by the front end.
    """
    config = config or WriteKVConfig.get_default()
    num_tokens, num_kv_heads, head_size = key.shape
    num_blocks, _, block_size = kv_cache.shape[:3]
    if num_tokens == 0:
        return
    finfo = torch.finfo(kv_cache.dtype)
    ks, ks_head, ks_slot = scale_args(k_scale, key)
    vs, vs_head, vs_slot = scale_args(v_scale, key)
    _write_kv_kernel[(num_tokens,)](
        key, value, slot_mapping, kv_cache, ks, vs, num_blocks * block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        ks_head, ks_slot, vs_head, vs_slot, fp8_max,
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_SIZE=head_size, BLOCK_SIZE=block_size, IS_FP8=fp8_max > 0,
        HAS_K_SCALE=k_scale is not None, HAS_V_SCALE=v_scale is not None,
        INTERPRETED=INTERPRETED, MANTISSA_BITS=round(-math.log2(finfo.eps)),
        MIN_EXPONENT=round(math.log2(finfo.tiny)),
        num_warps=config.num_warps)
