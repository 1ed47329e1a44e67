"""PyTorch front end: Triton kernels for MiniMax-M3 block-sparse GQA attention over a paged
KV cache, registered as torch.library ops, with a pure-PyTorch path for machines without
Triton. Depends on `interop` (spec, metadata, tables), never on `jax_sparse`."""
from interop.bridges import allocate_torch_kv_cache as allocate_kv_cache

from .backend import MiniMaxM3SparseBackend, MiniMaxM3SparseImpl, MiniMaxM3SparseMetadataBuilder
from .frontend import (minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode, sparse_attention,
                       write_kv)
from .ops import HAS_TRITON, IMPLS, INTERPRETED, default_impl

if HAS_TRITON:
    from .indexer import index_topk, write_index_k

__all__ = [
    "HAS_TRITON", "IMPLS", "INTERPRETED", "MiniMaxM3SparseBackend", "MiniMaxM3SparseImpl",
    "MiniMaxM3SparseMetadataBuilder", "allocate_kv_cache", "default_impl", "index_topk",
    "minimax_m3_sparse_attn", "minimax_m3_sparse_attn_decode", "sparse_attention",
    "write_index_k", "write_kv",
]
