"""The public PyTorch functions: validate at the boundary, then call the registered ops.

Every shape, dtype, device and stride problem raises here (`TypeError` for a wrong type or
dtype, `ValueError` for the rest) before any kernel launch. The checks read only shapes,
dtypes, strides and devices, never tensor values, so they trace under torch.compile and cost
nothing inside a CUDA graph.
"""
from __future__ import annotations

import torch

from interop import (CACHE_DTYPES, FP8_MAX, QUERY_DTYPES, SUPPORTED_BLOCK_SIZES,
                     SUPPORTED_HEAD_SIZES, SparseAttentionSpec, SparseMetadata,
                     check_prefill_algorithm)

from . import ops
from .selection import prefill_token_map

_QUERY_DTYPES = tuple(getattr(torch, name) for name in QUERY_DTYPES)
_CACHE_DTYPES = tuple({getattr(torch, name) for name in CACHE_DTYPES.values() if name})
_FP8_MAX = {getattr(torch, name): value for name, value in FP8_MAX.items()}
_INDEX_DTYPES = (torch.int32, torch.int64)


def _framework(x) -> str:
    """"jax", "numpy" or "" from the type's module, without importing JAX."""
    module = type(x).__module__.split(".")[0]
    if module in ("jax", "jaxlib"):
        return "jax"
    return "numpy" if module == "numpy" else ""


def _not_a_tensor(name: str, x, bridge: str = "interop.to_torch({name}, device)") -> TypeError:
    """The TypeError for a non-tensor argument; a JAX or NumPy array gets the bridge to use."""
    kind = _framework(x)
    hint = ""
    if kind:
        what = "a JAX array" if kind == "jax" else "a NumPy array"
        hint = f" ({what}: convert it with {bridge.format(name=name)})"
    return TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")


_CACHE_BRIDGE = "interop.kv_cache_to_torch({name}, spec)"


def _check_tensor(name: str, x, device: torch.device, dtypes, ndim: int,
                  bridge: str = "interop.to_torch({name}, device)") -> None:
    if not isinstance(x, torch.Tensor):
        raise _not_a_tensor(name, x, bridge)
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {list(dtypes)}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the query is on {device}")


def _check_int(name: str, value, minimum: int) -> None:
    """A Python int (TypeError otherwise) of at least `minimum` (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _token_knobs(implementation: str, num_splits, num_warps, num_stages) -> tuple:
    """The token kernel's knobs as the ops take them (ints, 0: the default); an int >= 1 each
    when given (TypeError / ValueError), and a ValueError when the implementation has no such
    knob (the eager path), rather than dropping it."""
    knobs = {"num_splits": num_splits, "num_warps": num_warps, "num_stages": num_stages}
    given = [name for name, value in knobs.items() if value is not None]
    for name in given:
        _check_int(name, knobs[name], 1)
    if given and implementation != "triton":
        raise ValueError(f"{' / '.join(given)}: knobs of the Triton token kernel, which "
                         f"implementation {implementation!r} does not run")
    return tuple(value or 0 for value in knobs.values())


def _check_spec(spec) -> None:
    if not isinstance(spec, SparseAttentionSpec):
        raise TypeError(f"spec must be an interop.SparseAttentionSpec, got {type(spec).__name__}")


def check_metadata(metadata) -> None:
    """The PyTorch flavour of SparseMetadata (TypeError naming the bridge otherwise)."""
    if not isinstance(metadata, SparseMetadata):
        raise TypeError(f"metadata must be an interop.SparseMetadata, got "
                        f"{type(metadata).__name__}")
    if not isinstance(metadata.block_table, torch.Tensor):
        kind = {"jax": "JAX", "numpy": "NumPy"}.get(_framework(metadata.block_table), "non-torch")
        raise TypeError(f"metadata holds {kind} arrays; convert it with "
                        "interop.to_torch(metadata, device)")


def _check_unit_stride(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along head_size (strides {x.stride()})")


def _check_length(name: str, x: torch.Tensor, length: int, what: str) -> None:
    if x.shape[0] != length:
        raise ValueError(f"{name} has {x.shape[0]} entries but {what} is {length}")


def _scale_tensor(name: str, scale, num_kv_heads: int, num_slots: int,
                  device: torch.device) -> torch.Tensor | None:
    """None, a float32 0-d tensor, or a float32 [num_kv_heads, num_slots] tensor."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        hint = " (convert it with interop.to_torch)" if _framework(scale) else ""
        raise TypeError(f"{name} must be None, a float or a tensor, got "
                        f"{type(scale).__name__}{hint}")
    if not isinstance(scale, torch.Tensor):
        return torch.full((), float(scale), dtype=torch.float32, device=device)
    if not scale.is_floating_point():
        raise TypeError(f"{name} must hold floats, got dtype {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but the query is on {device}")
    if scale.numel() == 1:
        return scale.reshape(()).float()
    if tuple(scale.shape) != (num_kv_heads, num_slots):
        raise ValueError(f"{name} shape {tuple(scale.shape)} does not match: expected a scalar "
                         f"or [{num_kv_heads}, {num_slots}] (num_kv_heads, num_blocks * "
                         "block_size)")
    return scale.float()


def _check_cache(kv_cache, num_kv_heads: int, head_size: int, device: torch.device,
                 k_scale, v_scale):
    """Validate the logical cache view; returns its FP8 max (0 if not FP8) and the scales."""
    _check_tensor("kv_cache", kv_cache, device, _CACHE_DTYPES, 5, _CACHE_BRIDGE)
    num_blocks, two, block_size, heads, size = kv_cache.shape
    if (two != 2 or block_size not in SUPPORTED_BLOCK_SIZES or heads != num_kv_heads
            or size != head_size):
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not match: expected the logical shape "
            f"(num_blocks, 2, block_size in {SUPPORTED_BLOCK_SIZES}, {num_kv_heads} kv heads, "
            f"{head_size})")
    _check_unit_stride("kv_cache", kv_cache)
    fp8_max = _FP8_MAX.get(kv_cache.dtype, 0.0)
    if not fp8_max:  # scales apply to FP8 caches only (vLLM passes 1.0 for 16-bit caches)
        return fp8_max, None, None
    slots = num_blocks * block_size
    return (fp8_max, _scale_tensor("k_scale", k_scale, num_kv_heads, slots, device),
            _scale_tensor("v_scale", v_scale, num_kv_heads, slots, device))


def _check_spec_cache(spec: SparseAttentionSpec, kv_cache, dtype: torch.dtype) -> None:
    """The cache has the spec's logical shape and stores what the spec says for `dtype` data."""
    if not isinstance(kv_cache, torch.Tensor):
        raise _not_a_tensor("kv_cache", kv_cache, _CACHE_BRIDGE)
    spec.check_logical_kv_cache_shape(kv_cache.shape)
    expected = spec.cache_storage_dtype(str(dtype).replace("torch.", ""))
    if kv_cache.dtype != getattr(torch, expected):
        raise TypeError(f"kv_cache has dtype {kv_cache.dtype} but kv_cache_dtype "
                        f"{spec.kv_cache_dtype!r} with {dtype} inputs stores {expected}")


def _check_attention(q, kv_cache, topk, block_table, num_kv_heads, sm_scale, output,
                     k_scale, v_scale):
    """The checks every attention entry point shares; returns (k_scale, v_scale) tensors."""
    if not isinstance(q, torch.Tensor):
        raise _not_a_tensor("q", q)
    device = q.device
    _check_tensor("q", q, device, _QUERY_DTYPES, 3)
    num_tokens, num_heads, head_size = q.shape
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head_size {head_size} is not supported; expected one of "
                         f"{SUPPORTED_HEAD_SIZES}")
    _check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    _check_unit_stride("q", q)
    _, k_scale, v_scale = _check_cache(kv_cache, num_kv_heads, head_size, device, k_scale,
                                       v_scale)
    _check_tensor("topk_idx", topk, device, _INDEX_DTYPES, 3)
    if topk.shape[0] != num_kv_heads or topk.shape[1] < num_tokens or topk.shape[2] < 1:
        raise ValueError(f"topk_idx shape {tuple(topk.shape)} does not match: expected "
                         f"[{num_kv_heads}, >= {num_tokens}, topk >= 1]")
    _check_tensor("block_table", block_table, device, _INDEX_DTYPES, 2)
    _check_tensor("output", output, device, (q.dtype,), 3)
    if output.shape != q.shape:
        raise ValueError(f"output shape {tuple(output.shape)} must equal the query shape "
                         f"{tuple(q.shape)}")
    _check_unit_stride("output", output)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")
    if not float(sm_scale) > 0.0:
        raise ValueError(f"sm_scale must be a positive float, got {sm_scale!r}")
    return k_scale, v_scale


def minimax_m3_sparse_attn(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, num_kv_heads, sm_scale, output,
                           k_scale=None, v_scale=None, *, implementation: str | None = None,
                           prefill_algorithm: str = "auto", num_splits: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           impl: str | None = None) -> None:
    """Block-sparse GQA attention of a prefill batch (the seed's call); writes `output`.

    q / output: [total_q, num_heads, head_size] bf16/fp16; kv_cache: logical view
    (num_blocks, 2, block_size, num_kv_heads, head_size), NHD or HND strides, cache dtype or
    FP8; topk_idx: [num_kv_heads, >= total_q, topk] int32; block_table: [num_reqs, max_blocks];
    cu_seqlens_q: [num_reqs + 1] query offsets from 0; seq_lens / prefix_lens: [num_reqs]
    (prefix = tokens cached before this step); max_query_len: unused (kept for the seed's
    signature: the grid runs over tokens). k_scale / v_scale: None, a float or a tensor
    (scalar or [num_kv_heads, num_blocks * block_size]), FP8 caches only. implementation,
    prefill_algorithm and the token kernel's knobs as in `sparse_attention`; impl: deprecated
    spelling of implementation.
    """
    check_prefill_algorithm(prefill_algorithm)
    k_scale, v_scale = _check_attention(q, kv_cache, topk_idx, block_table, num_kv_heads,
                                        sm_scale, output, k_scale, v_scale)
    num_reqs = block_table.shape[0]
    for name, x, length in (("cu_seqlens_q", cu_seqlens_q, num_reqs + 1),
                            ("seq_lens", seq_lens, num_reqs),
                            ("prefix_lens", prefix_lens, num_reqs)):
        _check_tensor(name, x, q.device, _INDEX_DTYPES, 1)
        _check_length(name, x, length, "block_table's rows (+1 for offsets)")
    token_to_req, positions = prefill_token_map(cu_seqlens_q, prefix_lens, q.shape[0])
    implementation = ops.check_implementation(implementation, q.device, impl)
    knobs = _token_knobs(implementation, num_splits, num_warps, num_stages)
    ops.call_sparse_attn(q, kv_cache, topk_idx, block_table, token_to_req, positions, output,
                         float(sm_scale), k_scale, v_scale, implementation, prefill_algorithm, 0,
                         *knobs)


def minimax_m3_sparse_attn_decode(q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads,
                                  sm_scale, output, decode_query_len, k_scale=None,
                                  v_scale=None, *, implementation: str | None = None,
                                  num_splits: int | None = None, num_warps: int | None = None,
                                  num_stages: int | None = None,
                                  impl: str | None = None) -> None:
    """Block-sparse GQA attention of a uniform decode batch (the seed's call); writes `output`.

    Request r owns query rows [r * L, (r + 1) * L) with L = decode_query_len (1, or 1 +
    speculative tokens), at positions seq_lens[r] - L .. seq_lens[r] - 1. Split-K over the
    top-k blocks with a split count from shapes only: capturable in a CUDA graph.
    Other arguments as in `minimax_m3_sparse_attn`; block_table / seq_lens: [num_reqs, ...].
    implementation and the token kernel's knobs as in `sparse_attention`; impl: the
    deprecated spelling of implementation.
    """
    k_scale, v_scale = _check_attention(q, kv_cache, topk_idx, block_table, num_kv_heads,
                                        sm_scale, output, k_scale, v_scale)
    _check_int("decode_query_len", decode_query_len, 1)
    _check_tensor("seq_lens", seq_lens, q.device, _INDEX_DTYPES, 1)
    _check_length("seq_lens", seq_lens, block_table.shape[0], "block_table's rows")
    if q.shape[0] != seq_lens.shape[0] * decode_query_len:
        raise ValueError(f"q has {q.shape[0]} tokens but {seq_lens.shape[0]} decode requests "
                         f"of decode_query_len {decode_query_len} make "
                         f"{seq_lens.shape[0] * decode_query_len}")
    implementation = ops.check_implementation(implementation, q.device, impl)
    knobs = _token_knobs(implementation, num_splits, num_warps, num_stages)
    ops.call_sparse_attn_decode(q, kv_cache, topk_idx, block_table, seq_lens, output,
                                float(sm_scale), decode_query_len, k_scale, v_scale,
                                implementation, *knobs)


def sparse_attention(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                     metadata: SparseMetadata, output=None, *, k_scale=None, v_scale=None,
                     implementation: str | None = None, prefill_algorithm: str = "auto",
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, impl: str | None = None,
                     fp8_dot: bool = False) -> torch.Tensor:
    """A mixed decode-first batch in one call; returns `output` (allocated when None).

    query: [num_tokens, num_heads, head_size]; kv_cache: the logical view in the spec's cache
    dtype; topk_indices: [num_kv_heads, >= num_tokens, topk_blocks] int32; metadata: the
    PyTorch flavour (`interop.to_torch(build_metadata(...), device)`), whose token_to_req /
    token_positions / block_table say which request and position each token has, and whose
    num_decode_tokens the decode rows. implementation: one of IMPLEMENTATIONS, "triton" (the
    Triton kernels: CUDA, or a CPU under Triton's interpreter) or "eager" (plain PyTorch ops);
    None: `default_implementation(query.device)`. prefill_algorithm: the path of the prefill
    rows, one of interop.PREFILL_ALGORITHMS: "auto" (the dispatcher picks per tile), "token",
    "union" or "k2q" (`torch_sparse/dispatch.py`); decode rows always run on the token kernel;
    the eager implementation has one path. num_splits / num_warps / num_stages: the token
    kernel's knobs, as in jax_sparse (`attention.TokenKernelConfig`; None: its default; a
    ValueError with implementation "eager", which has no such knob). impl: the deprecated
    spelling of implementation (a DeprecationWarning). fp8_dot: the FP8 tensor-core path for
    the prefill rows the union kernel runs ("union", or "auto"'s union tiles): query rows and
    probabilities rounded to e4m3, FP8 dots (a larger error: README, "Prefill"); it needs an
    fp8_e4m3 cache, implementation "triton", prefill_algorithm "union" or "auto" and a scalar
    v_scale (or none), else a ValueError. Decode rows and the token kernel's rows keep the
    default path.

    Every path gives the same rows on garbage input (contract 5): a row with no valid entry
    is zeros; a repeated entry counts once; a query row holding a NaN or an Inf that attends a
    key is NaN, as is a row that attends a K or V slot holding a NaN; slots no row attends
    never show. A JAX or NumPy array (or metadata flavour) is a TypeError naming the bridge
    (`interop.to_torch`, `interop.kv_cache_to_torch`).
    """
    check_prefill_algorithm(prefill_algorithm)
    _check_spec(spec)
    if not isinstance(query, torch.Tensor):
        raise _not_a_tensor("query", query)
    num_tokens = spec.check_query_shape(query.shape)
    _check_spec_cache(spec, kv_cache, query.dtype)
    if not isinstance(topk_indices, torch.Tensor):
        raise _not_a_tensor("topk_indices", topk_indices)
    check_metadata(metadata)
    spec.check_topk_shape(topk_indices.shape, num_tokens)
    if output is None:
        output = torch.empty_like(query)
    k_scale, v_scale = _check_attention(query, kv_cache, topk_indices, metadata.block_table,
                                        spec.num_kv_heads, spec.scale, output, k_scale, v_scale)
    for name in ("token_to_req", "token_positions"):
        x = getattr(metadata, name)
        _check_tensor(f"metadata.{name}", x, query.device, _INDEX_DTYPES, 1)
        if x.shape[0] < num_tokens:
            raise ValueError(f"metadata.{name} has {x.shape[0]} tokens but query has "
                             f"{num_tokens}")
    decode_tokens = metadata.num_decode_tokens
    if not 0 <= decode_tokens <= num_tokens:
        raise ValueError(f"metadata.num_decode_tokens ({decode_tokens}) must lie in [0, "
                         f"{num_tokens}] (the query's tokens)")
    implementation = ops.check_implementation(implementation, query.device, impl)
    knobs = _token_knobs(implementation, num_splits, num_warps, num_stages)
    _check_fp8_dot(fp8_dot, spec, implementation, prefill_algorithm, v_scale)
    ops.call_sparse_attn(query, kv_cache, topk_indices, metadata.block_table,
                         metadata.token_to_req[:num_tokens],
                         metadata.token_positions[:num_tokens], output, spec.scale, k_scale,
                         v_scale, implementation, prefill_algorithm, int(decode_tokens), *knobs,
                         fp8_dot)
    return output


def _check_fp8_dot(fp8_dot, spec: SparseAttentionSpec, implementation: str,
                   prefill_algorithm: str, v_scale) -> None:
    """A TypeError / ValueError where `sparse_attention`'s fp8_dot cannot run."""
    if not isinstance(fp8_dot, bool):
        raise TypeError(f"fp8_dot must be a bool, got {type(fp8_dot).__name__}")
    if not fp8_dot:
        return
    if CACHE_DTYPES[spec.kv_cache_dtype] != "float8_e4m3fn":
        raise ValueError(f"fp8_dot needs an fp8_e4m3 cache, got kv_cache_dtype "
                         f"{spec.kv_cache_dtype!r}")
    if implementation != "triton":
        raise ValueError(f"fp8_dot runs on the Triton union kernel; implementation "
                         f"{implementation!r} has no FP8 tensor-core path")
    if prefill_algorithm not in ("union", "auto"):
        raise ValueError(f"fp8_dot runs on the union kernel; prefill_algorithm "
                         f"{prefill_algorithm!r} has no FP8 tensor-core path (use 'union' or "
                         "'auto')")
    if v_scale is not None and v_scale.dim() != 0:
        raise ValueError("fp8_dot takes a scalar v_scale (or none), got one per slot")


def write_kv(kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec, k_scale=None,
             v_scale=None, *, implementation: str | None = None,
             impl: str | None = None) -> None:
    """Write new K/V into the cache in place.

    kv_cache: the logical view (num_blocks, 2, block_size, num_kv_heads, head_size) in the
    spec's cache dtype (a cache JAX owns: its `interop.kv_cache_to_torch` view, written in
    place); key / value: [num_tokens, num_kv_heads, head_size] bf16/fp16; slot_mapping:
    [>= num_tokens] int (page * block_size + offset; entries past num_tokens are ignored, as
    vLLM pads it; fewer is a ValueError). FP8 caches store value / scale saturated to the
    format's largest finite value. implementation as in `sparse_attention`; impl: its
    deprecated spelling.

    Slots (contract 5): a negative slot is padding, skipped. A slot >= num_blocks * block_size
    is never written; on CPU tensors it is a ValueError naming the first such token and its
    slot, raised before anything is written. On a GPU the check costs a host sync, so it runs
    only in check mode: set the environment variable M3_SPARSE_CHECKS=1 (read at every call;
    skipped during a CUDA-graph capture).
    """
    _check_spec(spec)
    if not isinstance(key, torch.Tensor):
        raise _not_a_tensor("key", key)
    device = key.device
    _check_tensor("key", key, device, _QUERY_DTYPES, 3)
    _check_tensor("value", value, device, (key.dtype,), 3)
    if key.shape != value.shape or key.shape[1:] != (spec.num_kv_heads, spec.head_size):
        raise ValueError(f"key shape {tuple(key.shape)} and value shape {tuple(value.shape)} "
                         f"must both be [num_tokens, {spec.num_kv_heads}, {spec.head_size}]")
    _check_unit_stride("key", key)
    _check_unit_stride("value", value)
    _check_spec_cache(spec, kv_cache, key.dtype)
    fp8_max, k_scale, v_scale = _check_cache(kv_cache, spec.num_kv_heads, spec.head_size,
                                             device, k_scale, v_scale)
    _check_tensor("slot_mapping", slot_mapping, device, _INDEX_DTYPES, 1)
    if slot_mapping.shape[0] < key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but key has "
                         f"{key.shape[0]} tokens")
    implementation = ops.check_implementation(implementation, device, impl)
    ops.call_write_kv(kv_cache, key, value, slot_mapping[:key.shape[0]], fp8_max, k_scale,
                      v_scale, implementation)
