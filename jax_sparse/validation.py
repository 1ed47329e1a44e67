"""Checks of the public entry points, each failure an error naming the field, its value and
what was expected: dtype mistakes are TypeError, shape and value mistakes ValueError (the
contract, section 5, in both front ends).

Trace-time checks look at static facts only (shapes, dtypes, the spec). The slot check of
`write_kv` reads values: on the host where that is free, or in the check mode (`checks_enabled`)
through a callback that raises when the jitted computation runs.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from interop import QUERY_DTYPES, SparseAttentionSpec, SparseMetadata

# The check mode: "1" turns it on for every call that does not pass checks= itself (read at
# each call, so a test or a debugging session may set it at any time).
CHECKS_ENV = "M3_SPARSE_CHECKS"


def _dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")  # no torch import needed


def check_jax_flavour(**arrays) -> None:
    """TypeError for a PyTorch tensor, or PyTorch-flavour metadata, handed to jax_sparse,
    naming the DLPack bridge that converts it (zero-copy on the same device)."""
    for name, x in arrays.items():
        if isinstance(x, SparseMetadata):
            if _is_torch(x.token_positions):
                raise TypeError(f"{name} is the PyTorch flavour of SparseMetadata; jax_sparse "
                                f"takes the JAX (or NumPy) flavour: interop.to_jax({name})")
        elif _is_torch(x):
            bridge = ("interop.kv_cache_to_jax(kv_cache, spec) (the physical array, "
                      "zero-copy)" if name == "kv_cache" else f"interop.to_jax({name})")
            raise TypeError(f"{name} is a PyTorch tensor; jax_sparse takes JAX arrays: "
                            f"convert it with {bridge}")


def check_metadata(metadata) -> None:
    """The metadata argument: a SparseMetadata of the JAX or NumPy flavour."""
    if not isinstance(metadata, SparseMetadata):
        raise TypeError(f"metadata must be an interop.SparseMetadata "
                        f"(interop.to_jax(interop.build_metadata(...))), got "
                        f"{type(metadata).__name__}")
    check_jax_flavour(metadata=metadata)


def check_static(**static) -> None:
    """TypeError for a jit-static argument (the spec, the implementation and its knobs) that
    an outer `jax.jit` turned into a traced array, naming the fix."""
    for name, value in static.items():
        if is_traced(value):
            raise TypeError(
                f"{name} is traced: an outer jax.jit made it an array, but it picks the compiled "
                "code and must be static. Mark it static in that jax.jit (for "
                "jax_sparse.sparse_attention: static_argnames=jax_sparse.STATIC_ARGNAMES), or "
                "call the jax_sparse function from inside your jitted function")


def _check_int(name: str, x, ndim: int) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(jnp.shape(x))}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must hold integers, got dtype {jnp.result_type(x)}")


def check_cache(spec: SparseAttentionSpec, kv_cache, data_dtype: str, data_name: str) -> int:
    """The physical cache against the spec and the query/key dtype; returns num_blocks."""
    if data_dtype not in QUERY_DTYPES:
        raise TypeError(f"{data_name} dtype {data_dtype} is not supported; expected one of "
                        f"{', '.join(QUERY_DTYPES)}")
    num_blocks = spec.check_physical_kv_cache_shape(kv_cache.shape)
    expected = spec.cache_storage_dtype(data_dtype)
    if _dtype_name(kv_cache) != expected:
        raise TypeError(f"kv_cache dtype {_dtype_name(kv_cache)} does not match the spec: "
                        f"expected {expected} (kv_cache_dtype={spec.kv_cache_dtype!r}, "
                        f"{data_name} dtype {data_dtype})")
    return num_blocks


def check_scale(name: str, scale, spec: SparseAttentionSpec, num_blocks: int):
    """None, [1] float32 (one scale) or [num_kv_heads, num_slots] float32; None unless FP8."""
    if scale is None or not spec.is_fp8:
        return None
    scale = jnp.asarray(scale, jnp.float32)
    if spec.check_scale_shape(name, scale.shape, num_blocks):
        return scale.reshape(1)
    return scale


def check_attention_inputs(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                           token_to_req, token_positions, block_table) -> int:
    """Everything `sparse_attention` reads; returns num_blocks."""
    num_tokens = spec.check_query_shape(query.shape)
    num_blocks = check_cache(spec, kv_cache, _dtype_name(query), "query")
    _check_int("topk_indices", topk_indices, 3)
    spec.check_topk_shape(topk_indices.shape, num_tokens)
    for name, x in (("token_to_req", token_to_req), ("token_positions", token_positions)):
        _check_int(name, x, 1)
        if x.shape[0] < num_tokens:
            raise ValueError(f"metadata.{name} has {x.shape[0]} entries but query has "
                             f"{num_tokens} tokens: expected >= {num_tokens}")
    _check_int("block_table", block_table, 2)
    if 0 in block_table.shape:
        raise ValueError(f"block_table shape {block_table.shape} is empty: expected "
                         "[num_reqs >= 1, max_blocks >= 1]")
    return num_blocks


def check_write_inputs(spec: SparseAttentionSpec, kv_cache, key, value, slot_mapping) -> int:
    """Everything `write_kv` reads but the slot values; returns num_blocks. slot_mapping may
    be longer than key (vLLM pads it; the extra entries are ignored), not shorter."""
    num_blocks = check_cache(spec, kv_cache, _dtype_name(key), "key")
    expected = (spec.num_kv_heads, spec.head_size)
    for name, x in (("key", key), ("value", value)):
        if x.ndim != 3 or x.shape[1:] != expected:
            raise ValueError(f"{name} shape {x.shape} does not match the spec: expected "
                             f"[num_tokens, {expected[0]}, {expected[1]}]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {value.shape} must match key shape {key.shape}")
    if value.dtype != key.dtype:
        raise TypeError(f"value dtype {_dtype_name(value)} must match key dtype "
                        f"{_dtype_name(key)}")
    _check_int("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] < key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries: expected "
                         f"{key.shape[0]} or more (one per token of key; extra entries are "
                         "ignored)")
    return num_blocks


def check_knobs(config, **minimums) -> None:
    """A config dataclass's knobs: each None (chosen at launch) or an int >= its minimum."""
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < minimum):
            raise ValueError(f"{name} ({value!r}) must be >= {minimum}, an int "
                             f"({type(config).__name__})")


# --- slot values ----------------------------------------------------------------------------

def checks_enabled(checks: bool | None) -> bool:
    """The check mode of one call: `checks` when given, else the environment variable
    M3_SPARSE_CHECKS ("1": on), read now."""
    if checks is None:
        return os.environ.get(CHECKS_ENV, "") == "1"
    return bool(checks)


def is_traced(x) -> bool:
    return isinstance(x, Tracer)


def host_values(x, *, fetch: bool):
    """x as a NumPy array where reading it is free (NumPy; a JAX array on the CPU), or with
    fetch=True any concrete array (a device-to-host copy, which waits for the device); None
    for a traced value or when reading it is not free."""
    if isinstance(x, np.ndarray):
        return x
    if is_traced(x) or not isinstance(x, jax.Array):
        return None
    if fetch or all(d.platform == "cpu" for d in x.devices()):
        return np.asarray(x)
    return None


def check_slots(slots, num_slots: int, what: str = "the cache") -> None:
    """ValueError naming the first token whose slot is >= num_slots (negative slots are
    padding: never written, never an error). slots: NumPy [num_tokens] int."""
    past = np.flatnonzero(np.asarray(slots) >= num_slots)
    if past.size:
        t = int(past[0])
        raise ValueError(f"slot_mapping[{t}] = {int(slots[t])} is past {what}: slots must be "
                         f"< num_blocks * block_size = {num_slots} ({past.size} tokens are; "
                         "a negative slot is padding and is skipped)")


def check_slots_when_run(slots, num_slots: int, what: str = "the cache") -> None:
    """`check_slots` on traced slots, when the computation runs (`jax.debug.callback`: on
    the host, after a device-to-host copy). Its ValueError reaches the caller as a
    jax.errors.JaxRuntimeError carrying the message, raised where the result is waited on."""
    jax.debug.callback(lambda s: check_slots(s, num_slots, what), slots)
