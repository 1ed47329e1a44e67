"""Framework-neutral core: the spec, the metadata schema and builder, the float64 reference,
and the DLPack bridges. Imports neither front end (PyTorch and JAX only inside the bridges)."""
from .bridges import (allocate_torch_kv_cache, kv_cache_to_jax, kv_cache_to_torch,
                      register_jax_pytrees, to_jax, to_torch, wait_for_writes)
from .indexer import IndexerSpec, reference_index_topk
from .metadata import (DecodeMetadata, PrefillMetadata, SparseMetadata, TopkReport,
                       build_metadata, validate_metadata, validate_topk)
from . import tiling
from .reference import reference_attention
from .spec import (CACHE_DTYPES, FP8_DTYPES, FP8_MAX, KV_CACHE_STRIDE_ORDERS,
                   PREFILL_ALGORITHMS, QUERY_DTYPES, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_SIZES,
                   SparseAttentionSpec, check_prefill_algorithm)

__all__ = [
    "CACHE_DTYPES", "FP8_DTYPES", "FP8_MAX", "KV_CACHE_STRIDE_ORDERS", "PREFILL_ALGORITHMS",
    "QUERY_DTYPES",
    "SUPPORTED_BLOCK_SIZES", "SUPPORTED_HEAD_SIZES", "DecodeMetadata", "IndexerSpec", "PrefillMetadata",
    "SparseAttentionSpec", "SparseMetadata", "TopkReport", "allocate_torch_kv_cache",
    "build_metadata", "check_prefill_algorithm", "kv_cache_to_jax", "kv_cache_to_torch", "reference_attention",
    "reference_index_topk",
    "register_jax_pytrees", "tiling", "to_jax", "to_torch", "validate_metadata", "validate_topk",
    "wait_for_writes",
]
