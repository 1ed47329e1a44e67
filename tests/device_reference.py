"""Float32 references computed on the device, for the GPU tests at MiniMax-M3 shapes.

`interop.reference_attention` (float64, NumPy) converts the whole cache to float64 on the host
and runs batched float64 products there: 5 to 40 s per M3-shaped case, most of the GPU suite's
time. These two compute the same operation on the device in float32, gathering only the
selected pages, and take `reference_attention`'s arguments (NumPy, or the framework's own
arrays), so a test swaps one for the other:

- `jax_reference`: written here with `jax.numpy` straight from CONTRACT.md section 2 (no
  kernel code, no `jax_sparse` helper); it imports neither front end, so JAX-only test files
  use it.
- `torch_reference`: the pure-PyTorch path `torch_sparse.eager.sparse_attention_eager`
  (float32 gathers, no Triton) with a float32 output, for the PyTorch test files.

tests/test_interop_device_reference.py checks both against the float64 reference on CPU cases (messy
selections, padding, both layouts, FP8 scales) to 1e-5, so a wrong device reference fails CI.
Float32 differs from float64 by about 1e-7 relative here: the GPU tests' 1e-2 tolerances stand.
"""
from __future__ import annotations

import functools

import numpy as np

import interop

# Elements of one gathered K (or V) tile [tokens, kv heads, topk, block, head] per step.
GATHER_ELEMENTS = 1 << 25


def _fp8_scales(spec, k_scale, v_scale):
    """Scales apply to FP8 caches only (the contract); other caches ignore them."""
    return (k_scale, v_scale) if spec.is_fp8 else (None, None)


def _chunk_tokens(spec) -> int:
    per_token = spec.num_kv_heads * spec.topk_blocks * spec.block_size * spec.head_size
    return max(1, GATHER_ELEMENTS // per_token)


@functools.cache
def _jax_attend():
    """The jitted float32 attention (built on first use so that importing needs no JAX)."""
    import jax
    import jax.numpy as jnp

    highest = jax.lax.Precision.HIGHEST  # no TF32: this is the reference

    def attend(spec, chunk, query, kv_cache, topk, positions, token_to_req, block_table,
               k_scale, v_scale):
        num_tokens = query.shape[0]
        num_blocks = kv_cache.shape[0]
        bs, kvh, k = spec.block_size, spec.num_kv_heads, spec.topk_blocks
        group = spec.num_heads // kvh
        pad = -num_tokens % chunk

        def split(x, fill):  # [num_tokens, ...] -> [steps, chunk, ...]
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
            return x.reshape(-1, chunk, *x.shape[1:])

        q = split(query.astype(jnp.float32).reshape(num_tokens, kvh, group, -1), 0)
        rows = split(jnp.moveaxis(topk[:, :num_tokens].astype(jnp.int32), 0, 1), -1)
        pos = split(positions[:num_tokens].astype(jnp.int32), -1)
        req = split(token_to_req[:num_tokens].astype(jnp.int32), 0)
        heads = jnp.arange(kvh)[None, :, None, None]
        offs = jnp.arange(bs)

        def gather(pages, kv):  # pages [C, G, K] -> [C, G, K, bs, head] in the storage dtype
            p = pages[..., None]
            if spec.kv_cache_layout == "NHD":  # physical (pages, 2, block, kv heads, head)
                return kv_cache[p, kv, offs, heads, :]
            return kv_cache[p, kv, heads, offs, :]  # HND: (pages, 2, kv heads, block, head)

        def scaled(x, scale, pages):
            x = x.astype(jnp.float32)
            if scale is None:
                return x
            if scale.ndim == 2:  # [kv heads, slots]: the scale of each slot
                return x * scale[heads, pages[..., None] * bs + offs][..., None]
            return x * scale.reshape(())

        def step(args):
            q, blocks, pos, req = args          # [C, G, group, D], [C, G, K], [C], [C]
            # A valid entry: a block the token may see (0 <= b <= p // block_size) ...
            limit = jnp.where(pos >= 0, pos // bs + 1, 0)[:, None, None]
            valid = (blocks >= 0) & (blocks < limit)
            # ... counted once if repeated ...
            earlier = jnp.tril(jnp.ones((k, k), bool), -1)
            repeat = (blocks[..., :, None] == blocks[..., None, :]) & earlier
            valid &= ~(repeat & valid[..., None, :]).any(-1)
            # ... whose page lies inside the block table and the cache.
            valid &= blocks < block_table.shape[1]
            pages = block_table[req[:, None, None], jnp.where(valid, blocks, 0)]
            valid &= (pages >= 0) & (pages < num_blocks)
            pages = jnp.where(valid, pages, 0)
            # Keys j <= p inside the valid blocks.
            key_pos = blocks[..., None] * bs + offs                     # [C, G, K, bs]
            mask = (valid[..., None] & (key_pos <= pos[:, None, None, None]))
            mask = mask.reshape(*mask.shape[:2], 1, -1)                  # [C, G, 1, K * bs]
            keys = scaled(gather(pages, 0), k_scale, pages).reshape(*mask.shape[:2], -1,
                                                                    q.shape[-1])
            vals = scaled(gather(pages, 1), v_scale, pages).reshape(keys.shape)
            scores = spec.scale * jnp.einsum("cghd,cgnd->cghn", q, keys, precision=highest)
            scores = jnp.where(mask, scores, -jnp.inf)
            peak = scores.max(-1, keepdims=True)
            weights = jnp.where(mask, jnp.exp(scores - jnp.where(mask.any(-1, keepdims=True),
                                                                  peak, 0.0)), 0.0)
            denom = weights.sum(-1, keepdims=True)
            vals = jnp.where(mask[:, :, 0, :, None], vals, 0.0)  # masked keys add nothing
            out = jnp.einsum("cghn,cgnd->cghd", weights, vals, precision=highest)
            return jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)

        out = jax.lax.map(step, (q, rows, pos, req))
        return out.reshape(-1, spec.num_heads, out.shape[-1])[:num_tokens]

    return jax.jit(attend, static_argnums=(0, 1))


def jax_reference(spec, query, kv_cache, topk_indices, metadata, k_scale=None, v_scale=None):
    """Block-sparse GQA attention in float32 on JAX's default device.

    Arguments as `interop.reference_attention`'s, except the cache: the physical array in
    `spec.kv_cache_layout` (NumPy or JAX). Returns float32 NumPy [num_tokens, num_heads,
    head_size]; rows with no valid entry are zeros.
    """
    import jax.numpy as jnp
    num_tokens = spec.check_query_shape(tuple(query.shape))
    spec.check_physical_kv_cache_shape(tuple(kv_cache.shape))
    spec.check_topk_shape(tuple(topk_indices.shape), num_tokens)
    scales = [None if s is None else jnp.asarray(s, jnp.float32)
              for s in _fp8_scales(spec, k_scale, v_scale)]
    arrays = [jnp.asarray(x) for x in (query, kv_cache, topk_indices, metadata.token_positions,
                                       metadata.token_to_req, metadata.block_table)]
    out = _jax_attend()(spec, _chunk_tokens(spec), *arrays, *scales)
    return np.asarray(out)


def torch_reference(spec, query, kv_cache, topk_indices, metadata, k_scale=None, v_scale=None):
    """Block-sparse GQA attention in float32 on PyTorch's device (CUDA when present).

    Arguments as `interop.reference_attention`'s: the cache is a PyTorch logical view or a
    physical NumPy array. Returns float32 NumPy [num_tokens, num_heads, head_size].
    """
    import torch

    from torch_sparse.eager import sparse_attention_eager

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(kv_cache, torch.Tensor):
        kv_cache = interop.kv_cache_to_torch(np.asarray(kv_cache), spec)
    kv_cache = kv_cache.to(device)

    def tensor(x, dtype=None):
        x = x if isinstance(x, torch.Tensor) else interop.to_torch(np.asarray(x))
        return x.to(device=device, dtype=dtype)

    query = tensor(query)
    scales = [None if s is None else tensor(s, torch.float32)
              for s in _fp8_scales(spec, k_scale, v_scale)]
    out = torch.empty(query.shape, dtype=torch.float32, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # this is the reference
    try:
        sparse_attention_eager(query, kv_cache, tensor(topk_indices),
                               tensor(metadata.block_table), tensor(metadata.token_to_req),
                               tensor(metadata.token_positions), out, spec.scale, *scales)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out.cpu().numpy()
