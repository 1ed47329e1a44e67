"""The static description of one sparse attention layer: every shape, dtype and layout fact.

This module is the single home of the supported sizes, the cache dtype names and the cache
layouts; both front ends import these tables instead of restating them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# page size == sparse block size: one selected block is exactly one cache page.
SUPPORTED_BLOCK_SIZES = (128,)
SUPPORTED_HEAD_SIZES = (128,)
QUERY_DTYPES = ("bfloat16", "float16")

# kv_cache_dtype name -> storage dtype name ("auto" stores the query dtype).
CACHE_DTYPES = {
    "auto": None,
    "bfloat16": "bfloat16",
    "float16": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# Largest finite value of each FP8 format: quantization saturates to it.
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}

# Logical cache axes: (num_blocks, 2, block_size, num_kv_heads, head_size); K at [:, 0], V at [:, 1].
KV_CACHE_STRIDE_ORDERS = {
    "NHD": (0, 1, 2, 3, 4),
    "HND": (0, 1, 3, 2, 4),
}


# How prefill tokens are attended (contract, section 4); every value gives the same result.
# "auto": the front end's dispatcher; "token": one program per (token, KV head); "union": tiles
# of consecutive tokens over the union of their blocks; "k2q": key-to-query (one program per
# selected block, streaming the queries that chose it) plus a log-sum-exp combine.
PREFILL_ALGORITHMS = ("auto", "token", "union", "k2q")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_prefill_algorithm(value) -> str:
    """`value` if it names a prefill algorithm, else a ValueError listing the choices."""
    if value not in PREFILL_ALGORITHMS:
        raise ValueError(f"prefill_algorithm {value!r} is unknown; expected one of "
                         f"{_choices(PREFILL_ALGORITHMS)}")
    return value


@dataclasses.dataclass(frozen=True)
class SparseAttentionSpec:
    """Static facts of a MiniMax-M3 sparse attention layer (hashable: a valid `jax.jit` static).

    Args:
      num_heads: query heads.
      num_kv_heads: KV heads; query head h reads KV head h // (num_heads // num_kv_heads).
      head_size: per-head dimension (supported: 128).
      topk_blocks: selected blocks per (token, KV head) row of `topk_indices`.
      block_size: tokens per page == tokens per sparse block (supported: 128).
      kv_cache_dtype: one of CACHE_DTYPES ("auto" means the query dtype).
      kv_cache_layout: "NHD" or "HND" (see KV_CACHE_STRIDE_ORDERS).
      sm_scale: softmax scale; None means head_size ** -0.5.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int = 128
    topk_blocks: int = 16
    block_size: int = 128
    kv_cache_dtype: str = "auto"
    kv_cache_layout: str = "NHD"
    sm_scale: float | None = None

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "topk_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head_size {self.head_size!r} is not supported; expected one of "
                             f"{_choices(SUPPORTED_HEAD_SIZES)}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size {self.block_size!r} is not supported; expected one of "
                             f"{_choices(SUPPORTED_BLOCK_SIZES)}")
        if self.kv_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is unknown; expected one "
                             f"of {_choices(CACHE_DTYPES)}")
        if self.kv_cache_layout not in KV_CACHE_STRIDE_ORDERS:
            raise ValueError(f"kv_cache_layout {self.kv_cache_layout!r} is unknown; expected "
                             f"one of {_choices(KV_CACHE_STRIDE_ORDERS)}")
        if self.sm_scale is not None and not (float(self.sm_scale) > 0.0):
            raise ValueError(f"sm_scale must be a positive float or None, got {self.sm_scale!r}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        """The softmax scale in effect."""
        return float(self.sm_scale) if self.sm_scale is not None else self.head_size ** -0.5

    @property
    def is_fp8(self) -> bool:
        return CACHE_DTYPES[self.kv_cache_dtype] in FP8_DTYPES

    def cache_storage_dtype(self, query_dtype: str) -> str:
        """Name of the dtype the cache holds for queries of `query_dtype` ("bfloat16"...)."""
        if query_dtype not in QUERY_DTYPES:
            raise TypeError(f"query dtype {query_dtype!r} is not supported; expected one of "
                            f"{_choices(QUERY_DTYPES)}")
        return CACHE_DTYPES[self.kv_cache_dtype] or query_dtype

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Logical cache shape: (num_blocks, 2, block_size, num_kv_heads, head_size)."""
        return (num_blocks, 2, self.block_size, self.num_kv_heads, self.head_size)

    def kv_cache_stride_order(self) -> tuple[int, ...]:
        """Physical axis order of the logical axes (vLLM's get_kv_cache_stride_order)."""
        return KV_CACHE_STRIDE_ORDERS[self.kv_cache_layout]

    def physical_kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of the array in memory (what JAX holds)."""
        logical = self.kv_cache_shape(num_blocks)
        return tuple(logical[i] for i in self.kv_cache_stride_order())

    def check_physical_kv_cache_shape(self, shape) -> int:
        """Validate a physical cache shape; returns num_blocks."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5 or shape != self.physical_kv_cache_shape(shape[0]):
            raise ValueError(
                f"kv_cache shape {shape} does not match the spec: expected the "
                f"{self.kv_cache_layout} physical shape {self.physical_kv_cache_shape(shape[0] if shape else 0)} "
                f"(num_blocks, ...)")
        return shape[0]

    def check_logical_kv_cache_shape(self, shape) -> int:
        """Validate a logical cache shape; returns num_blocks."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 5 or shape != self.kv_cache_shape(shape[0]):
            raise ValueError(
                f"kv_cache shape {shape} does not match the spec: expected the logical shape "
                f"{self.kv_cache_shape(shape[0] if shape else 0)} "
                "(num_blocks, 2, block_size, num_kv_heads, head_size)")
        return shape[0]

    def check_query_shape(self, shape, name: str = "query") -> int:
        """Validate [num_tokens, num_heads, head_size]; returns num_tokens."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[1:] != (self.num_heads, self.head_size):
            raise ValueError(f"{name} shape {shape} does not match the spec: expected "
                             f"[num_tokens, {self.num_heads}, {self.head_size}]")
        return shape[0]

    def check_scale_shape(self, name: str, shape, num_blocks: int) -> bool:
        """A k/v scale is one value or one per (KV head, slot); returns True for one value."""
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) == 1:
            return True
        slots = (self.num_kv_heads, num_blocks * self.block_size)
        if shape != slots:
            raise ValueError(f"{name} shape {shape} does not match: expected a scalar or "
                             f"[{slots[0]}, {slots[1]}] (num_kv_heads, num_blocks * block_size)")
        return False

    def check_topk_shape(self, shape, num_tokens: int) -> None:
        shape = tuple(int(s) for s in shape)
        if (len(shape) != 3 or shape[0] != self.num_kv_heads or shape[1] < num_tokens
                or shape[2] != self.topk_blocks):
            raise ValueError(f"topk_indices shape {shape} does not match the spec: expected "
                             f"[{self.num_kv_heads}, >= {num_tokens}, {self.topk_blocks}]")
