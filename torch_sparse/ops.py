"""The operations registered with `torch.library`.

Registered custom ops are opaque to `torch.compile`: model code that calls them compiles with
`fullgraph=True`, and the fake implementations below let the compiler trace them without
running a kernel. Every op writes into a tensor it is given (declared in `mutates_args`) and
returns nothing, so it allocates no output and a CUDA graph can capture a decode step.

`implementation` picks the backend per call: "triton" (the kernels; compiled on CUDA,
interpreted on a CPU when TRITON_INTERPRET=1) or "eager" (plain PyTorch ops, `eager.py`, for
machines without Triton); "reference", its old name, is a deprecated alias.
`prefill_algorithm` (a str) and `first_prefill_token` (an int) pick the kernels of a batch's
prefill rows (`dispatch.py`); the eager path ignores them.

Check mode: with the environment variable M3_SPARSE_CHECKS=1 (read at every call), write_kv
checks its slots on a GPU too (`check_slots`), at the price of a host sync.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch

from . import eager, selection

try:
    from . import attention, cache, dispatch, union
except ImportError:  # no Triton: only the eager path runs
    attention = cache = dispatch = union = None

IMPLEMENTATIONS = ("triton", "eager")
IMPLS = IMPLEMENTATIONS  # deprecated name
# Old implementation names, still accepted with a DeprecationWarning.
DEPRECATED_IMPLEMENTATIONS = {"reference": "eager"}
HAS_TRITON = attention is not None
# Whether the Triton kernels run in Triton's interpreter (on CPU tensors). Triton reads
# TRITON_INTERPRET when it defines the kernels, so this is fixed when torch_sparse is imported.
INTERPRETED = HAS_TRITON and attention.INTERPRETED
CHECKS_ENV = "M3_SPARSE_CHECKS"


def default_implementation(device: torch.device | str | None = None) -> str:
    """The implementation that runs on `device` (default: the current CUDA device when there
    is one, else the CPU) when a call names none: "triton" on a CUDA device, and on a CPU when
    the kernels run in Triton's interpreter (INTERPRETED: TRITON_INTERPRET=1 was set before
    torch_sparse was imported); "eager" (plain PyTorch ops) everywhere else, and wherever
    Triton is not installed."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if HAS_TRITON and (torch.device(device).type == "cuda" or INTERPRETED):
        return "triton"
    return "eager"


def default_impl(device: torch.device | str | None = None) -> str:
    """Deprecated name of `default_implementation`."""
    _deprecated("default_impl() is deprecated; use default_implementation()")
    return default_implementation(device)


def _deprecated(message: str) -> None:
    """A DeprecationWarning pointing at the caller of the public function (not while
    torch.compile traces: dynamo cannot trace warnings.warn)."""
    if not torch.compiler.is_compiling():
        warnings.warn(message, DeprecationWarning, stacklevel=4)


def check_implementation(implementation: str | None, device: torch.device,
                         impl: str | None = None) -> str:
    """The implementation a call runs: `implementation`, else `impl` (its deprecated keyword),
    else the device's default; a ValueError naming the fix when it cannot run on `device`."""
    if impl is not None:
        _deprecated("the impl= keyword is deprecated; use implementation=")
        if implementation is not None and implementation != impl:
            raise ValueError(f"implementation={implementation!r} and impl={impl!r} disagree; "
                             "pass implementation= only")
        implementation = impl
    if implementation is None:
        return default_implementation(device)
    if implementation in DEPRECATED_IMPLEMENTATIONS:
        new = DEPRECATED_IMPLEMENTATIONS[implementation]
        _deprecated(f"implementation {implementation!r} is deprecated; use {new!r}")
        implementation = new
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is unknown; expected one of "
                         f"{IMPLEMENTATIONS}")
    if implementation == "triton" and not HAS_TRITON:
        raise ValueError("implementation 'triton' needs Triton, which is not installed; use "
                         "implementation='eager'")
    if implementation == "triton" and device.type != "cuda" and not INTERPRETED:
        late = (" (TRITON_INTERPRET is set now, but Triton reads it when torch_sparse is "
                "imported)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
        raise ValueError(f"implementation 'triton' cannot run on {device}: the Triton kernels "
                         f"need a CUDA device or Triton's interpreter{late}; set "
                         "TRITON_INTERPRET=1 before importing torch_sparse, or use "
                         "implementation='eager'")
    return implementation


def checks_enabled() -> bool:
    """Check mode (M3_SPARSE_CHECKS=1), read at call time."""
    return os.environ.get(CHECKS_ENV, "") == "1"


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """ValueError naming the first token whose slot is >= num_slots (outside the cache).

    Runs where it is free, on CPU tensors, and in check mode on any device (a host sync; not
    during a CUDA-graph capture, where it is skipped). Negative slots are padding, never an
    error. Without a check a slot outside the cache is skipped: never written.
    """
    if slot_mapping.device.type != "cpu":
        if not checks_enabled() or (slot_mapping.is_cuda
                                    and torch.cuda.is_current_stream_capturing()):
            return
    bad = torch.nonzero(slot_mapping >= num_slots)
    if bad.numel():
        t = int(bad[0, 0])
        raise ValueError(f"slot_mapping[{t}] = {int(slot_mapping[t])} is outside the cache: "
                         f"token {t}'s slot must be < num_blocks * block_size = {num_slots} "
                         "(or negative: padding, not written)")


def token_config(num_splits: int, num_warps: int, num_stages: int):
    """The token kernel's `TokenKernelConfig` from the ops' int knobs (0: the default), or
    None when every one is 0."""
    knobs = {name: value for name, value in (("num_splits", num_splits),
                                             ("num_warps", num_warps),
                                             ("num_stages", num_stages)) if value}
    if not knobs:
        return None
    return dataclasses.replace(attention.TokenKernelConfig.get_default(), **knobs)


def _sparse_attn(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                block_table: torch.Tensor, token_to_req: torch.Tensor,
                token_positions: torch.Tensor, output: torch.Tensor, sm_scale: float,
                k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                implementation: str, prefill_algorithm: str = "auto",
                first_prefill_token: int = 0, num_splits: int = 0, num_warps: int = 0,
                num_stages: int = 0, fp8_dot: bool = False) -> None:
    """Sparse attention of tokens given by (token_to_req, token_positions) [num_tokens]; rows
    from first_prefill_token on are prefill tokens. num_splits / num_warps / num_stages: the
    token kernel's knobs, 0 for its default (`token_config`). fp8_dot: the union kernel's FP8
    tensor-core path (`union.UnionConfig.fp8_dot`; the caller checked it applies)."""
    if implementation != "triton":  # "eager" (or its old name, when the op is called directly)
        eager.sparse_attention_eager(query, kv_cache, topk, block_table, token_to_req,
                                     token_positions, output, sm_scale, k_scale, v_scale)
    else:
        dispatch.sparse_attention(query, kv_cache, topk, block_table, token_to_req,
                                  token_positions, output, sm_scale, k_scale=k_scale,
                                  v_scale=v_scale, first_prefill_token=first_prefill_token,
                                  prefill_algorithm=prefill_algorithm,
                                  token_config=token_config(num_splits, num_warps, num_stages),
                                  union_config=union.UnionConfig(fp8_dot=True) if fp8_dot
                                  else None)


def _sparse_attn_decode(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, output: torch.Tensor,
                       sm_scale: float, decode_query_len: int,
                       k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                       implementation: str, num_splits: int = 0, num_warps: int = 0,
                       num_stages: int = 0) -> None:
    """Sparse attention of a uniform decode batch: seq_lens [num_reqs], num_reqs * L tokens;
    the knobs as in `_sparse_attn`."""
    if implementation != "triton":
        token_to_req, positions = selection.decode_token_map(seq_lens, decode_query_len)
        eager.sparse_attention_eager(query, kv_cache, topk, block_table, token_to_req,
                                     positions, output, sm_scale, k_scale, v_scale)
    else:
        attention.launch_sparse_attention(query, kv_cache, topk, block_table, output, sm_scale,
                                          seq_lens=seq_lens, decode_query_len=decode_query_len,
                                          k_scale=k_scale, v_scale=v_scale,
                                          config=token_config(num_splits, num_warps, num_stages))


def _write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, fp8_max: float, k_scale: Optional[torch.Tensor],
             v_scale: Optional[torch.Tensor], implementation: str) -> None:
    """Write key / value [num_tokens, num_kv_heads, head_size] at slot_mapping [num_tokens].

    Negative slots are skipped; a slot past the cache is a ValueError where checking is free
    (CPU tensors) or asked for (M3_SPARSE_CHECKS=1), else skipped (`check_slots`). The check
    runs here, inside the op, so a torch.compile'd caller checks too.
    """
    check_slots(slot_mapping, kv_cache.shape[0] * kv_cache.shape[2])
    if implementation != "triton":
        eager.write_kv_eager(kv_cache, key, value, slot_mapping, fp8_max=fp8_max,
                             k_scale=k_scale, v_scale=v_scale)
    else:
        cache.launch_write_kv(kv_cache, key, value, slot_mapping, fp8_max=fp8_max,
                              k_scale=k_scale, v_scale=v_scale)


sparse_attn = torch.library.custom_op("minimax_m3_sparse::sparse_attn", _sparse_attn,
                                     mutates_args=("output",))
sparse_attn_decode = torch.library.custom_op("minimax_m3_sparse::sparse_attn_decode",
                                            _sparse_attn_decode, mutates_args=("output",))
write_kv = torch.library.custom_op("minimax_m3_sparse::write_kv", _write_kv,
                                  mutates_args=("kv_cache",))


def _eager_or_op(op, body):
    """Call the registered op while torch.compile traces, its body otherwise: eager calls
    skip the dispatcher's Python custom-op path (about 0.1 ms a call on the H100 host)."""
    def call(*args):
        return (op if torch.compiler.is_compiling() else body)(*args)
    call.__doc__ = body.__doc__
    return call


call_sparse_attn = _eager_or_op(sparse_attn, _sparse_attn)
call_sparse_attn_decode = _eager_or_op(sparse_attn_decode, _sparse_attn_decode)
call_write_kv = _eager_or_op(write_kv, _write_kv)


# The ops only write into their arguments: tracing them needs no computation.
@sparse_attn.register_fake
def _(query, kv_cache, topk, block_table, token_to_req, token_positions, output, sm_scale,
      k_scale, v_scale, implementation, prefill_algorithm="auto", first_prefill_token=0,
      num_splits=0, num_warps=0, num_stages=0, fp8_dot=False) -> None:
    return None


@sparse_attn_decode.register_fake
def _(query, kv_cache, topk, block_table, seq_lens, output, sm_scale, decode_query_len,
      k_scale, v_scale, implementation, num_splits=0, num_warps=0, num_stages=0) -> None:
    return None


@write_kv.register_fake
def _(kv_cache, key, value, slot_mapping, fp8_max, k_scale, v_scale, implementation) -> None:
    return None
