"""JAX + Pallas front end: block-sparse GQA attention over a paged KV cache (MiniMax-M3).

Every function is usable under `jax.jit`; the metadata is `interop.to_jax(build_metadata(...))`,
a pytree whose arrays and counts are traced.
"""
import interop

from .api import (IMPLEMENTATIONS, default_implementation, minimax_m3_sparse_attn,
                  minimax_m3_sparse_attn_decode, sparse_attention)
from .attention import default_num_splits, paged_sparse_attention
from .cache import write_kv
from .xla import sparse_attention_xla

interop.register_jax_pytrees()

__all__ = [
    "IMPLEMENTATIONS", "default_implementation", "default_num_splits", "minimax_m3_sparse_attn",
    "minimax_m3_sparse_attn_decode", "paged_sparse_attention", "sparse_attention",
    "sparse_attention_xla", "write_kv",
]
