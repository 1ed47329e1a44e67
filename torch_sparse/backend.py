"""vLLM-shaped backend classes for MiniMax-M3 sparse layers, with no dependency on vLLM.

`MiniMaxM3SparseBackend` carries the static facts (name, dtypes, cache shape and stride
order); `MiniMaxM3SparseMetadataBuilder` builds the common `interop.SparseMetadata` once per
step for every layer; `MiniMaxM3SparseImpl.forward` runs one layer on a decode-first batch,
reading the decode rows of the top-k from `[:, :num_decode_tokens]` and the prefill rows from
`[:, num_decode_tokens:num_tokens]`, as the seed does.
"""
from __future__ import annotations

import warnings
from typing import ClassVar

import torch

from interop import (CACHE_DTYPES, KV_CACHE_STRIDE_ORDERS, SUPPORTED_BLOCK_SIZES,
                     SUPPORTED_HEAD_SIZES, SparseAttentionSpec, SparseMetadata, build_metadata,
                     to_torch, validate_metadata)

from .frontend import (check_metadata, minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode,
                       write_kv)


class MiniMaxM3SparseBackend:
    """Block-sparse GQA attention over a paged cache whose page is one sparse block."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(CACHE_DTYPES)

    @staticmethod
    def get_name() -> str:
        return "MINIMAX_M3_SPARSE"

    @staticmethod
    def get_impl_cls() -> type["MiniMaxM3SparseImpl"]:
        return MiniMaxM3SparseImpl

    @staticmethod
    def get_builder_cls() -> type["MiniMaxM3SparseMetadataBuilder"]:
        return MiniMaxM3SparseMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        # page size == sparse block size: one selected block is exactly one page.
        return list(SUPPORTED_BLOCK_SIZES)

    @classmethod
    def is_sparse(cls) -> bool:
        return True

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False,
                                  kv_cache_layout: str = "NHD") -> tuple[int, ...]:
        """Physical order of the logical cache axes ("NHD" or "HND"); with the layer axis
        in front when include_num_layers_dimension."""
        if kv_cache_layout not in KV_CACHE_STRIDE_ORDERS:
            raise ValueError(f"kv_cache_layout {kv_cache_layout!r} is unknown; expected one of "
                             f"{list(KV_CACHE_STRIDE_ORDERS)}")
        order = KV_CACHE_STRIDE_ORDERS[kv_cache_layout]
        if include_num_layers_dimension:
            return (0,) + tuple(axis + 1 for axis in order)
        return order


class MiniMaxM3SparseMetadataBuilder:
    """Builds the per-step metadata (once, shared by every layer) on `device`.

    reorder_batch_threshold: requests with this many query tokens are the decodes, which the
    scheduler puts first. num_blocks: pages in the KV cache; when known, each batch passes
    `interop.validate_metadata` on the host (a ValueError naming the first page outside
    [0, num_blocks), the first slot past the cache, a block-table row too narrow for its
    sequence) before any kernel sees it.
    """

    def __init__(self, spec: SparseAttentionSpec, device: torch.device | str,
                 decode_query_len: int = 1, num_blocks: int | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.reorder_batch_threshold = decode_query_len
        self.num_blocks = num_blocks

    def build(self, query_lens, seq_lens, block_table, num_tokens: int | None = None,
              num_blocks: int | None = None) -> SparseMetadata:
        """query_lens / seq_lens: [num_reqs] host ints; block_table: [num_reqs, max_blocks]
        (host or device); num_tokens: padded token rows (default: the sum of query_lens);
        num_blocks: the cache's pages (default: the builder's)."""
        if isinstance(block_table, torch.Tensor):
            block_table = block_table.cpu().numpy()
        metadata = build_metadata(
            query_lens, seq_lens, block_table, decode_query_len=self.reorder_batch_threshold,
            block_size=self.spec.block_size, num_tokens=num_tokens)
        num_blocks = self.num_blocks if num_blocks is None else num_blocks
        if num_blocks is not None:
            validate_metadata(metadata, num_blocks, block_size=self.spec.block_size)
        return to_torch(metadata, self.device)


class MiniMaxM3SparseImpl:
    """One sparse layer: `forward` attends the queries to the blocks the indexer selected."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, kv_cache_dtype: str = "auto",
                 kv_cache_layout: str = "NHD", topk_blocks: int = 16,
                 block_size: int = 128, implementation: str | None = None,
                 impl: str | None = None, **kwargs) -> None:
        self.spec = SparseAttentionSpec(
            num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads, head_size=head_size,
            topk_blocks=topk_blocks, block_size=block_size, kv_cache_dtype=kv_cache_dtype,
            kv_cache_layout=kv_cache_layout, sm_scale=scale)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = self.spec.scale
        self.num_kv_heads = self.spec.num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        if impl is not None:
            warnings.warn("MiniMaxM3SparseImpl(impl=...) is deprecated; use implementation=",
                          DeprecationWarning, stacklevel=2)
            implementation = implementation or impl
        self.implementation = implementation

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write this step's K/V ([num_tokens, num_kv_heads, head_size]) into the cache."""
        write_kv(kv_cache, key, value, slot_mapping, self.spec, getattr(layer, "_k_scale", None),
                 getattr(layer, "_v_scale", None), implementation=self.implementation)

    def forward(self, layer, query: torch.Tensor, kv_cache: torch.Tensor,
                topk_indices: torch.Tensor, attn_metadata: SparseMetadata | None,
                output: torch.Tensor) -> torch.Tensor:
        """query / output: [>= num_tokens, num_heads * head_size] (or already split into
        heads); topk_indices: [num_kv_heads, >= num_tokens, topk]. The layer's `_k_scale` /
        `_v_scale` (vLLM's names), when present, dequantize an FP8 cache. Without metadata
        (a profiling run) the output is returned untouched."""
        if attn_metadata is None:
            return output
        check_metadata(attn_metadata)
        md = attn_metadata
        nd = md.num_decode_tokens
        num_tokens = nd + md.num_prefill_tokens
        q = query[:num_tokens].view(-1, self.num_heads, self.head_size)
        out = output[:num_tokens].view(-1, self.num_heads, self.head_size)
        output[num_tokens:].zero_()  # padding rows (CUDA-graph sizes): zeros, as sparse_attention
        scales = (getattr(layer, "_k_scale", None), getattr(layer, "_v_scale", None))
        decode = md.decode
        if decode is not None:
            minimax_m3_sparse_attn_decode(
                q[:nd], kv_cache, topk_indices[:, :nd], decode.block_table, decode.seq_lens,
                self.num_kv_heads, self.scale, out[:nd], decode.decode_query_len, *scales,
                implementation=self.implementation)
        prefill = md.prefill
        if prefill is not None:
            minimax_m3_sparse_attn(
                q[nd:], kv_cache, topk_indices[:, nd:num_tokens], prefill.block_table,
                prefill.cu_seqlens_q, prefill.seq_lens, prefill.context_lens,
                prefill.max_query_len, self.num_kv_heads, self.scale, out[nd:], *scales,
                implementation=self.implementation)
        return output
