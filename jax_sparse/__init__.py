"""JAX + Pallas front end: block-sparse GQA attention over a paged KV cache (MiniMax-M3).

Every function is usable under `jax.jit`; the metadata is `interop.to_jax(build_metadata(...))`,
a pytree whose arrays and counts are traced.
"""
import interop

from .api import (CONFIGS, IMPLEMENTATIONS, STATIC_ARGNAMES, default_implementation,
                  implementation_config, minimax_m3_sparse_attn, minimax_m3_sparse_attn_decode,
                  sparse_attention)
from .attention import PallasConfig, default_num_splits, paged_sparse_attention
from .cache import allocate_kv_cache, write_kv
from .dispatch import sparse_attention_pallas
from .indexer import INDEX_IMPLEMENTATIONS, index_topk, write_index_k
from .k2q import paged_sparse_attention_k2q
from .mosaic import MosaicConfig
from .sharding import (kv_cache_sharding, pack_dp_metadata, sharded_sparse_attention,
                       sharded_write_kv)
from .tpu import TpuConfig
from .union import paged_sparse_attention_union, plan_union
from .xla import XlaConfig, sparse_attention_xla

interop.register_jax_pytrees()

__all__ = [
    "CONFIGS", "IMPLEMENTATIONS", "INDEX_IMPLEMENTATIONS", "MosaicConfig", "PallasConfig",
    "STATIC_ARGNAMES", "TpuConfig", "XlaConfig", "allocate_kv_cache", "default_implementation",
    "default_num_splits", "implementation_config", "index_topk", "kv_cache_sharding",
    "minimax_m3_sparse_attn",
    "minimax_m3_sparse_attn_decode", "paged_sparse_attention", "paged_sparse_attention_k2q",
    "paged_sparse_attention_union", "pack_dp_metadata", "plan_union", "sharded_sparse_attention",
    "sharded_write_kv", "sparse_attention", "sparse_attention_pallas", "sparse_attention_xla",
    "write_index_k", "write_kv",
]
