"""The same operation in plain `jax.numpy` (XLA): for platforms the Pallas kernels do not
cover, and a second opinion in tests.

Each token gathers its selected pages ([num_kv_heads, topk, block_size, head_size]) and runs
one masked softmax over them; tokens go through `lax.map` in chunks so the gathered pages of
only `token_chunk` tokens are alive at once.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from interop import SparseAttentionSpec

from .selection import key_mask, select_rows
from .validation import check_knobs

TOKEN_CHUNK = 8  # tokens whose gathered pages are alive at once


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """The knob of implementation="xla" (`sparse_attention_xla`'s keyword).

      token_chunk: tokens gathered and attended at once (`lax.map`'s batch size).
    """

    token_chunk: int = TOKEN_CHUNK

    def __post_init__(self):
        check_knobs(self, token_chunk=1)

    @classmethod
    def get_default(cls) -> "XlaConfig":
        return cls()


def _gather_pages(kv_cache, kv: int, pages, layout: str):
    """K (kv=0) or V (kv=1) of pages [num_kv_heads, topk]: [num_kv_heads, topk, bs, D]."""
    heads = jnp.arange(pages.shape[0])[:, None]
    if layout == "NHD":
        return kv_cache[pages, kv, :, heads, :]
    return kv_cache[pages, kv, heads, :, :]


def _apply_scale(x, scale, pages, block_size: int):
    """x [num_kv_heads, rows, topk, bs] times the dequantization scale of each key's slot."""
    if scale is None:
        return x
    if scale.ndim == 1:
        return x * scale[0]
    slots = pages[..., None] * block_size + jnp.arange(block_size)
    return x * scale[jnp.arange(pages.shape[0])[:, None, None], slots][:, None]


def sparse_attention_xla(spec: SparseAttentionSpec, query, kv_cache, topk_indices, token_to_req,
                         token_positions, block_table, k_scale=None, v_scale=None, *,
                         token_chunk: int = TOKEN_CHUNK):
    """Same arguments and result as `attention.paged_sparse_attention` (see there)."""
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, group, bs = spec.num_kv_heads, spec.num_queries_per_kv, spec.block_size
    num_reqs, max_blocks = block_table.shape
    layout = spec.kv_cache_layout

    def one_token(args):
        q, rows, req, position = args                     # [H, D], [G, K], [], []
        req = jnp.clip(req, 0, num_reqs - 1)
        valid, block, pages = select_rows(
            rows, position, lambda b: block_table[req, b], block_size=bs,
            max_blocks=max_blocks, num_blocks=kv_cache.shape[0])
        mask = key_mask(valid, block, position, bs)       # [G, K, bs]
        k = _gather_pages(kv_cache, 0, pages, layout).astype(q.dtype)
        v = _gather_pages(kv_cache, 1, pages, layout).astype(q.dtype)
        qg = q.reshape(num_kv_heads, group, head_size)
        scores = jnp.einsum("gqd,gksd->gqks", qg, k, preferred_element_type=jnp.float32)
        scores = _apply_scale(scores, k_scale, pages, bs) * spec.scale
        scores = jnp.where(mask[:, None], scores, -jnp.inf)
        peak = scores.max(axis=(-2, -1), keepdims=True)
        weights = jnp.where(mask[:, None], jnp.exp(scores - jnp.where(
            jnp.isfinite(peak), peak, 0.0)), 0.0)
        denom = weights.sum(axis=(-2, -1))
        weights = _apply_scale(weights, v_scale, pages, bs)
        v = jnp.where(mask[..., None], v, 0)              # keys past the token may hold NaN
        out = jnp.einsum("gqks,gksd->gqd", weights.astype(q.dtype), v,
                         preferred_element_type=jnp.float32)
        # A group that attends nothing gives zeros. One that does divides by its sum whatever
        # it holds: NaN when a score or an attended value was (a NaN or Inf query, a NaN in an
        # attended slot), 0 when every score was -inf (an Inf query): a NaN row either way.
        attended = mask.any(axis=(-2, -1))[:, None, None]  # [G, 1, 1]
        out = jnp.where(attended, out / jnp.where(attended, denom[..., None], 1.0), 0)
        return out.reshape(num_heads, head_size).astype(q.dtype)

    rows = jnp.swapaxes(topk_indices[:, :num_tokens], 0, 1)  # [T, G, K]
    return lax.map(one_token, (query, rows, token_to_req, token_positions),
                   batch_size=token_chunk)
