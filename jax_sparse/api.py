"""The jitted front end: the mixed decode-first batch, and the seed's prefill / decode calls.

Static under `jax.jit`: the spec, the padded sizes (token, request, block-table and cache
shapes) and the implementation knobs. Traced: every array, the metadata included (a pytree
whose counts are leaves too), so a new batch of the same padded sizes reuses the compiled code.
Nothing here reads a traced value on the host.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from interop import (CACHE_DTYPES, KV_CACHE_STRIDE_ORDERS, SparseAttentionSpec, SparseMetadata,
                     check_prefill_algorithm)

from .attention import PallasConfig
from .dispatch import sparse_attention_mosaic, sparse_attention_pallas
from .mosaic import MosaicConfig
from .tpu import TpuConfig, sparse_attention_tpu
from .validation import (check_attention_inputs, check_jax_flavour, check_metadata, check_scale,
                         check_static)
from .xla import XlaConfig, sparse_attention_xla

IMPLEMENTATIONS = ("pallas", "mosaic", "tpu", "xla")
# Each implementation's knobs: a frozen dataclass whose fields are its launcher's keywords.
CONFIGS = {"pallas": PallasConfig, "mosaic": MosaicConfig, "tpu": TpuConfig, "xla": XlaConfig}
_KNOBS = ("implementation", "config", "num_splits", "num_warps", "num_stages")
# The arguments of `sparse_attention` an outer jax.jit must hold static (strings, ints and
# configs that pick the compiled code): jax.jit(jax_sparse.sparse_attention,
# static_argnames=jax_sparse.STATIC_ARGNAMES).
_BODY_STATIC = ("spec", "prefill_algorithm", *_KNOBS)
STATIC_ARGNAMES = (*_BODY_STATIC, "fp8_dot")


def default_implementation() -> str:
    """The platform's default: "tpu" (Pallas TPU) on a TPU, "pallas" (Pallas on the Triton
    backend) on a GPU and on CPU (interpret mode), "xla" elsewhere."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    return "pallas" if backend in ("gpu", "cpu") else "xla"


def implementation_config(implementation: str, config=None, **knobs):
    """The config `implementation` runs with: `config` (None: its family's default) with the
    knobs given as keywords (None: not given) set on it.

    A config of another family, or a knob the implementation does not take (num_warps for
    "mosaic", any knob for "xla"...), is a ValueError: a knob is never silently dropped.
    """
    family = CONFIGS[implementation]
    if config is None:
        config = family.get_default()
    elif not isinstance(config, family):
        raise ValueError(f"config {config!r} is not for implementation={implementation!r}: "
                         f"expected a jax_sparse.{family.__name__}")
    fields = [f.name for f in dataclasses.fields(family)]
    given = {name: value for name, value in knobs.items() if value is not None}
    for name, value in given.items():
        if name not in fields:
            raise ValueError(f"{name}={value!r} is not a knob of implementation="
                             f"{implementation!r}: it takes {', '.join(fields)} "
                             f"(jax_sparse.{family.__name__})")
    return dataclasses.replace(config, **given)


def _attention(spec, query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
               k_scale, v_scale, num_decode_tokens, *, implementation, prefill_algorithm,
               config, num_splits, num_warps, num_stages):
    check_prefill_algorithm(prefill_algorithm)
    num_blocks = check_attention_inputs(spec, query, kv_cache, topk_indices, token_to_req,
                                        token_positions, block_table)
    implementation = implementation or default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is unknown; expected one of "
                         f"{', '.join(map(repr, IMPLEMENTATIONS))}")
    config = implementation_config(implementation, config, num_splits=num_splits,
                                   num_warps=num_warps, num_stages=num_stages)
    splits = getattr(config, "num_splits", None)
    if splits is not None and spec.topk_blocks % splits:
        raise ValueError(f"num_splits {splits!r} must be a positive divisor of "
                         f"topk_blocks ({spec.topk_blocks})")
    num_tokens = query.shape[0]
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    args = (spec, query, kv_cache, i32(topk_indices), i32(token_to_req[:num_tokens]),
            i32(token_positions[:num_tokens]), i32(block_table),
            check_scale("k_scale", k_scale, spec, num_blocks),
            check_scale("v_scale", v_scale, spec, num_blocks))
    knobs = dataclasses.asdict(config)
    if implementation == "xla":
        return sparse_attention_xla(*args, **knobs)
    paths = {"pallas": sparse_attention_pallas, "mosaic": sparse_attention_mosaic,
             "tpu": sparse_attention_tpu}
    return paths[implementation](*args, num_decode_tokens=jnp.asarray(num_decode_tokens,
                                                                       jnp.int32),
                                 prefill_algorithm=prefill_algorithm, **knobs)


# The jitted body takes only the metadata fields it reads (three arrays and a count): a jitted
# call's host cost grows with its argument count (CPU, no-op body: 29 us with these arrays, 61 us with the whole
# 18-leaf metadata), so the public call below unpacks the metadata before the jit boundary.
_attention_jit = jax.jit(_attention, static_argnames=_BODY_STATIC)


def sparse_attention(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                     metadata: SparseMetadata, *, k_scale=None, v_scale=None,
                     implementation: str | None = None, prefill_algorithm: str = "auto",
                     config=None, num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, fp8_dot: bool = False):
    """Block-sparse GQA attention of a decode-first batch (contract, section 2). Jitted (the
    spec and the knobs static); call it directly or from inside a jitted step. To jit it
    yourself, keep its static arguments static:
    `jax.jit(jax_sparse.sparse_attention, static_argnames=jax_sparse.STATIC_ARGNAMES)`.

    Args:
      spec: the layer's static facts (a jit static).
      query: [num_tokens, num_heads, head_size] bfloat16 / float16.
      kv_cache: the physical cache, spec.physical_kv_cache_shape(num_blocks), in the spec's
        storage dtype.
      topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int, logical blocks per row;
        invalid entries (negative, future, past the block table) are skipped.
      metadata: JAX-flavour SparseMetadata (`interop.to_jax`); its token_to_req,
        token_positions, block_table and num_decode_tokens (traced) are read.
      k_scale / v_scale: FP8 caches only: None, a scalar or [num_kv_heads, num_blocks *
        block_size] float32 indexed by slot.
      implementation: one of IMPLEMENTATIONS: "pallas" (Pallas, Triton backend; GPU, or
        interpret mode on CPU), "mosaic" (Pallas, Mosaic GPU; Hopper GPUs), "tpu" (Pallas
        TPU; a TPU, or interpret mode on CPU) or "xla"; default: `default_implementation()`.
      prefill_algorithm: the Pallas path of the prefill tokens (a jit static): "auto" (the
        dispatcher, `jax_sparse.dispatch`), "token", "union" or "k2q"; every value gives the
        same result within rounding. The XLA implementation checks it and has one path.
      config: the implementation's knobs, its family's frozen dataclass (CONFIGS:
        PallasConfig, MosaicConfig, TpuConfig, XlaConfig); None: `get_default()`.
      num_splits / num_warps / num_stages: knobs set on that config (None: not given):
        "pallas" takes all three (the token kernel's splits of each top-k row, Triton warps
        and pipeline stages), "mosaic" num_splits; a knob the implementation does not take
        is a ValueError.
      fp8_dot: the FP8 tensor-core path (FP8 dots over e4m3-rounded queries), which
        torch_sparse's union kernel has and jax_sparse does not: True is a ValueError.
    Returns: [num_tokens, num_heads, head_size] in the query dtype; zeros for tokens with no
      valid entry and for padding tokens. Garbage in (contract, section 5): a query row with a
      NaN or Inf gives a NaN row when it attends a key (zeros when it attends none), a NaN in
      an attended K or V slot a NaN row; a block listed twice in a row is attended once.
    Raises: TypeError for a dtype mistake or a PyTorch tensor / metadata (naming the interop
      bridge), ValueError for a shape or value mistake; at trace time, before any launch.
    """
    if fp8_dot is not False:
        raise ValueError(f"fp8_dot={fp8_dot!r}: jax_sparse has no FP8 tensor-core path (only "
                         "torch_sparse's union kernel does); leave it False")
    check_jax_flavour(query=query, kv_cache=kv_cache, topk_indices=topk_indices,
                      k_scale=k_scale, v_scale=v_scale)
    check_metadata(metadata)
    check_static(spec=spec, implementation=implementation, prefill_algorithm=prefill_algorithm,
                 config=config, num_splits=num_splits, num_warps=num_warps,
                 num_stages=num_stages)
    return _attention_jit(spec, query, kv_cache, topk_indices, metadata.token_to_req,
                          metadata.token_positions, metadata.block_table, k_scale, v_scale,
                          metadata.num_decode_tokens, implementation=implementation,
                          prefill_algorithm=prefill_algorithm, config=config,
                          num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


def _seed_spec(q, kv_cache, topk_idx, num_kv_heads: int, sm_scale, layout: str):
    """The spec the seed's calls imply: shapes from the arrays, the cache dtype from its own."""
    if q.ndim != 3:
        raise ValueError(f"q shape {q.shape} must be [num_tokens, num_heads, head_size]")
    if topk_idx.ndim != 3:
        raise ValueError(f"topk_idx shape {topk_idx.shape} must be "
                         "[num_kv_heads, num_tokens, topk]")
    if layout not in KV_CACHE_STRIDE_ORDERS:
        raise ValueError(f"kv_cache_layout {layout!r} is unknown; expected one of "
                         f"{', '.join(map(repr, KV_CACHE_STRIDE_ORDERS))}")
    if kv_cache.ndim != 5:
        raise ValueError(f"kv_cache shape {kv_cache.shape} must be the 5-D {layout} physical "
                         "cache")
    # The block axis of the physical cache: where the logical axis 2 lands.
    block_size = kv_cache.shape[KV_CACHE_STRIDE_ORDERS[layout].index(2)]
    cache_dtype, query_dtype = jnp.dtype(kv_cache.dtype).name, jnp.dtype(q.dtype).name
    names = [n for n, storage in CACHE_DTYPES.items() if storage == cache_dtype]
    if cache_dtype != query_dtype and not names:
        raise TypeError(f"kv_cache dtype {cache_dtype} is not a cache dtype; expected the "
                         f"query dtype or one of {sorted({s for s in CACHE_DTYPES.values() if s})}")
    return SparseAttentionSpec(
        num_heads=q.shape[1], num_kv_heads=num_kv_heads, head_size=q.shape[2],
        topk_blocks=topk_idx.shape[2], block_size=block_size,
        kv_cache_dtype="auto" if cache_dtype == query_dtype else names[0],
        kv_cache_layout=layout, sm_scale=sm_scale)


def _seed_prefill(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens, prefix_lens,
                  num_kv_heads, sm_scale, k_scale, v_scale, *, kv_cache_layout, implementation,
                  prefill_algorithm, config, num_splits, num_warps, num_stages):
    spec = _seed_spec(q, kv_cache, topk_idx, num_kv_heads, sm_scale, kv_cache_layout)
    num_reqs = seq_lens.shape[0]
    tokens = jnp.arange(q.shape[0], dtype=jnp.int32)
    starts = cu_seqlens_q.astype(jnp.int32)
    req = jnp.clip(jnp.searchsorted(starts[1:], tokens, side="right"), 0, num_reqs - 1)
    positions = prefix_lens[req] + tokens - starts[req]
    positions = jnp.where((tokens < starts[-1]) & (positions < seq_lens[req]), positions, -1)
    return _attention(spec, q, kv_cache, topk_idx, req, positions, block_table, k_scale,
                      v_scale, 0, implementation=implementation,
                      prefill_algorithm=prefill_algorithm, config=config, num_splits=num_splits,
                      num_warps=num_warps, num_stages=num_stages)


_seed_prefill_jit = jax.jit(_seed_prefill, static_argnames=(
    "num_kv_heads", "sm_scale", "kv_cache_layout", "prefill_algorithm", *_KNOBS))


def minimax_m3_sparse_attn(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, num_kv_heads: int, sm_scale: float,
                           k_scale=None, v_scale=None, *, kv_cache_layout: str = "NHD",
                           implementation: str | None = None, prefill_algorithm: str = "auto",
                           config=None, num_splits: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None):
    """The seed's prefill call, returning the output.

    Args:
      q: [num_tokens, num_heads, head_size]; rows past cu_seqlens_q[-1] are padding (zeros).
      kv_cache: the physical cache in `kv_cache_layout`; its dtype is the cache dtype.
      topk_idx: [num_kv_heads, num_tokens, topk] int.
      block_table: [num_prefills, max_blocks] int.
      cu_seqlens_q: [num_prefills + 1] int query offsets, rebased to 0.
      seq_lens / prefix_lens: [num_prefills] int, context + query tokens / context tokens.
      max_query_len: accepted for drop-in compatibility; the grid runs over tokens and does
        not need it.
      num_kv_heads, sm_scale: static.
    Other arguments as in `sparse_attention`.
    """
    check_jax_flavour(q=q, kv_cache=kv_cache, topk_idx=topk_idx, block_table=block_table,
                      cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, prefix_lens=prefix_lens,
                      k_scale=k_scale, v_scale=v_scale)
    check_static(num_kv_heads=num_kv_heads, sm_scale=sm_scale, kv_cache_layout=kv_cache_layout,
                 implementation=implementation, prefill_algorithm=prefill_algorithm,
                 config=config, num_splits=num_splits, num_warps=num_warps,
                 num_stages=num_stages)
    del max_query_len
    return _seed_prefill_jit(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                             prefix_lens, num_kv_heads, sm_scale, k_scale, v_scale,
                             kv_cache_layout=kv_cache_layout, implementation=implementation,
                             prefill_algorithm=prefill_algorithm, config=config,
                             num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)


# jit's compile-cache probe, as on a jitted function (the no-recompile tests read it).
minimax_m3_sparse_attn._cache_size = _seed_prefill_jit._cache_size


def _seed_decode(q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads, sm_scale,
                 decode_query_len, k_scale, v_scale, *, kv_cache_layout, implementation,
                 config, num_splits, num_warps, num_stages):
    if not isinstance(decode_query_len, int) or decode_query_len < 1:
        raise ValueError(f"decode_query_len must be an int >= 1, got {decode_query_len!r}")
    spec = _seed_spec(q, kv_cache, topk_idx, num_kv_heads, sm_scale, kv_cache_layout)
    num_reqs = seq_lens.shape[0]
    tokens = jnp.arange(q.shape[0], dtype=jnp.int32)
    req = tokens // decode_query_len
    positions = (seq_lens[jnp.minimum(req, num_reqs - 1)] - decode_query_len
                 + tokens % decode_query_len)
    positions = jnp.where(req < num_reqs, positions, -1)
    return _attention(spec, q, kv_cache, topk_idx, jnp.minimum(req, num_reqs - 1), positions,
                      block_table, k_scale, v_scale, q.shape[0], implementation=implementation,
                      prefill_algorithm="token", config=config, num_splits=num_splits,
                      num_warps=num_warps, num_stages=num_stages)


_seed_decode_jit = jax.jit(_seed_decode, static_argnames=(
    "num_kv_heads", "sm_scale", "decode_query_len", "kv_cache_layout", *_KNOBS))


def minimax_m3_sparse_attn_decode(q, kv_cache, topk_idx, block_table, seq_lens,
                                  num_kv_heads: int, sm_scale: float, decode_query_len: int,
                                  k_scale=None, v_scale=None, *, kv_cache_layout: str = "NHD",
                                  implementation: str | None = None, config=None,
                                  num_splits: int | None = None, num_warps: int | None = None,
                                  num_stages: int | None = None):
    """The seed's decode call, returning the output.

    Args:
      q: [num_decodes * decode_query_len (+ padding rows), num_heads, head_size]; token t is
        query j = t % decode_query_len of request t // decode_query_len, at position
        seq_lens[r] - decode_query_len + j.
      block_table: [num_decodes, max_blocks] int; seq_lens: [num_decodes] int.
      num_kv_heads, sm_scale, decode_query_len: static.
    Other arguments as in `minimax_m3_sparse_attn`.
    """
    check_jax_flavour(q=q, kv_cache=kv_cache, topk_idx=topk_idx, block_table=block_table,
                      seq_lens=seq_lens, k_scale=k_scale, v_scale=v_scale)
    check_static(num_kv_heads=num_kv_heads, sm_scale=sm_scale,
                 decode_query_len=decode_query_len, kv_cache_layout=kv_cache_layout,
                 implementation=implementation, config=config, num_splits=num_splits,
                 num_warps=num_warps, num_stages=num_stages)
    return _seed_decode_jit(q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads,
                            sm_scale, decode_query_len, k_scale, v_scale,
                            kv_cache_layout=kv_cache_layout, implementation=implementation,
                            config=config, num_splits=num_splits, num_warps=num_warps,
                            num_stages=num_stages)


minimax_m3_sparse_attn_decode._cache_size = _seed_decode_jit._cache_size
