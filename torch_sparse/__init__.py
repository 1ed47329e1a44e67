"""PyTorch front end: Triton kernels for MiniMax-M3 block-sparse GQA attention over a paged
KV cache, registered as torch.library ops, with an eager path in plain PyTorch ops for
machines without Triton. Depends on `interop` (spec, metadata, tables), never on `jax_sparse`.

Which path runs: `implementation=` of each call, one of IMPLEMENTATIONS ("triton", "eager");
without one, `default_implementation(device)`: "triton" on a CUDA device and, when INTERPRETED
(TRITON_INTERPRET=1 was set before this package was imported), on a CPU through Triton's
interpreter; "eager" elsewhere. Deprecated names, still accepted: `impl=` (warns), `IMPLS`,
`default_impl()` and the implementation name "reference" (now "eager").
"""
import warnings as _warnings

from interop.bridges import allocate_torch_kv_cache as allocate_kv_cache

from .backend import MiniMaxM3SparseBackend, MiniMaxM3SparseImpl, MiniMaxM3SparseMetadataBuilder
from .frontend import (minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode, sparse_attention,
                       write_kv)
from .ops import HAS_TRITON, IMPLEMENTATIONS, INTERPRETED, default_impl, default_implementation

if HAS_TRITON:
    from .indexer import index_topk, write_index_k

__all__ = [
    "HAS_TRITON", "IMPLEMENTATIONS", "INTERPRETED", "MiniMaxM3SparseBackend",
    "MiniMaxM3SparseImpl", "MiniMaxM3SparseMetadataBuilder", "allocate_kv_cache",
    "default_impl", "default_implementation", "index_topk", "minimax_m3_sparse_attn",
    "minimax_m3_sparse_attn_decode", "sparse_attention", "write_index_k", "write_kv",
]


def __getattr__(name):
    if name == "IMPLS":
        _warnings.warn("torch_sparse.IMPLS is deprecated; use torch_sparse.IMPLEMENTATIONS",
                       DeprecationWarning, stacklevel=2)
        return IMPLEMENTATIONS
    raise AttributeError(f"module 'torch_sparse' has no attribute {name!r}")
