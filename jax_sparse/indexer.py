"""The lightning indexer in JAX (contract, section 6): index-key cache writes, block scores and
the top-k selection that sparse attention takes.

Three implementations of the scores, one selection:
- "xla": plain `jax.numpy`. Each token gathers its request's visible pages and takes, per
  index head and block, the largest dot product over the block's keys j <= position
  (`lax.map` over tokens in chunks, so only `token_chunk` tokens' pages are alive at once).
- "pallas": a Pallas kernel (Triton backend on a GPU, interpret mode elsewhere). A program
  scores one tile of a request's tokens (`index_tile_tokens`, at least 16 for the dot) against
  a range of its visible blocks: it loads each index-key page once and dots it with the
  tile's queries of every index head. Tiles never straddle requests; their (request, first
  token) come from `plan_index_tiles` (XLA, static shapes), so one launch serves a mixed
  decode-first batch. Small grids (decode) split each tile's blocks over programs
  (`index_num_splits`). Workspace: the scores, float32 [heads, num_tokens, max_blocks].
- "tpu": the Pallas TPU kernel of `indexer_tpu.py` (interpret mode off a TPU), on the same
  tile plan: one program per tile, its pages DMA'd from HBM through a VMEM ring.
Selection (`select_topk`, XLA): each visible block's 32-bit priority key
(`interop.indexer.priority_keys`: forced init, forced local, score, NaN) and `lax.top_k`, whose
lower-index-first rule among equal keys is the contract's tie rule: exact on every backend.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from interop import FP8_MAX, QUERY_DTYPES
from interop.arrays import is_torch_tensor
from interop.indexer import (MAGNITUDE_MASK, PRIORITY_HIDDEN, PRIORITY_INIT, PRIORITY_LOCAL,
                             PRIORITY_NAN, IndexerSpec)
from interop.tiling import (MIN_ROWS, cdiv, index_max_tiles, index_num_splits,
                            index_tile_tokens, next_power_of_2)

from .indexer_tpu import index_scores_tpu

INDEX_IMPLEMENTATIONS = ("pallas", "tpu", "xla")


def default_index_implementation() -> str:
    """"pallas" on a GPU, "tpu" on a TPU, "xla" elsewhere (the Pallas kernels interpret slowly
    on a CPU)."""
    return {"gpu": "pallas", "tpu": "tpu"}.get(jax.default_backend(), "xla")


# ---------------------------------------------------------------- validation

def _dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def _check_array(name: str, x) -> None:
    if is_torch_tensor(x):
        raise TypeError(f"{name} is a torch.Tensor; convert it with interop.to_jax (metadata "
                        "too) or interop.kv_cache_to_jax")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def _check_int(name: str, x, ndim: int) -> None:
    _check_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integers, got dtype {_dtype_name(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_data(ispec: IndexerSpec, x, name: str, index_cache) -> int:
    """x (query or key) and the cache: dtypes (TypeError), then the cache shape; num_blocks."""
    _check_array(name, x)
    _check_array("index_cache", index_cache)
    if _dtype_name(x) not in QUERY_DTYPES:
        raise TypeError(f"{name} has dtype {_dtype_name(x)}; expected one of "
                        f"{', '.join(QUERY_DTYPES)}")
    expected = ispec.cache_storage_dtype(_dtype_name(x))
    if _dtype_name(index_cache) != expected:
        raise TypeError(f"index_cache has dtype {_dtype_name(index_cache)} but "
                        f"index_cache_dtype {ispec.index_cache_dtype!r} with {_dtype_name(x)} "
                        f"{name} stores {expected}")
    return ispec.check_index_cache_shape(index_cache.shape)


def check_index_inputs(ispec: IndexerSpec, index_query, index_cache, token_to_req,
                       token_positions, block_table, query_start_loc) -> int:
    """Everything `index_topk` reads (static facts only); returns num_tokens."""
    if not isinstance(ispec, IndexerSpec):
        raise TypeError(f"ispec must be an interop.IndexerSpec, got {type(ispec).__name__}")
    _check_data(ispec, index_query, "index_query", index_cache)
    num_tokens = ispec.check_index_query_shape(index_query.shape)
    for name, x in (("token_to_req", token_to_req), ("token_positions", token_positions)):
        _check_int(f"metadata.{name}", x, 1)
        if x.shape[0] < num_tokens:
            raise ValueError(f"metadata.{name} has {x.shape[0]} entries but index_query has "
                             f"{num_tokens} tokens")
    _check_int("metadata.block_table", block_table, 2)
    if 0 in block_table.shape:
        raise ValueError(f"metadata.block_table shape {tuple(block_table.shape)} is empty: "
                         "expected [num_reqs >= 1, max_blocks >= 1]")
    _check_int("metadata.query_start_loc", query_start_loc, 1)
    if query_start_loc.shape[0] != block_table.shape[0] + 1:
        raise ValueError(f"metadata.query_start_loc has {query_start_loc.shape[0]} entries: "
                         f"expected {block_table.shape[0] + 1} (num_reqs + 1)")
    return num_tokens


# ---------------------------------------------------------------- the index-key cache write

@functools.partial(jax.jit, static_argnames=("ispec",), donate_argnames=("index_cache",))
def _write_index_k(index_cache, index_key, slot_mapping, ispec: IndexerSpec):
    num_blocks, bs = index_cache.shape[0], ispec.block_size
    slots = slot_mapping[:index_key.shape[0]].astype(jnp.int32)
    name = _dtype_name(index_cache)
    key = index_key
    if name in FP8_MAX:  # saturate: the cast would turn out-of-range values into NaN
        key = jnp.clip(key.astype(jnp.float32), -FP8_MAX[name], FP8_MAX[name])
    # A negative slot goes to page num_blocks, out of range: mode="drop" skips the write.
    pages = jnp.where(slots >= 0, slots // bs, num_blocks)
    return index_cache.at[pages, slots % bs].set(key.astype(index_cache.dtype), mode="drop")


def write_index_k(index_cache, index_key, slot_mapping, ispec: IndexerSpec):
    """Store each token's index key at its slot; returns the new cache.

    Args:
      index_cache: (num_blocks, block_size, index_head_size) in the spec's storage dtype for
        the key dtype. Donated: XLA writes into its buffer and the argument is consumed (use
        the returned array); under an outer `jax.jit`, donate it there. Checked before the
        donation: a failed call leaves the cache alive.
      index_key: [num_tokens, index_head_size] bfloat16 / float16.
      slot_mapping: [>= num_tokens] int, page * block_size + offset (the KV cache's slots);
        negative: not written; past the cache: never written (a ValueError when the slots are
        a host NumPy array).
    Returns: the updated cache (FP8: keys saturated to the format's largest finite value).
    """
    num_blocks = _check_data(ispec, index_key, "index_key", index_cache)
    num_tokens = ispec.check_index_key_shape(index_key.shape)
    _check_int("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but index_key has "
                         f"{num_tokens} tokens")
    if isinstance(slot_mapping, np.ndarray):
        bad = np.flatnonzero(slot_mapping[:num_tokens] >= num_blocks * ispec.block_size)
        if bad.size:
            t = int(bad[0])
            raise ValueError(f"slot_mapping[{t}] = {slot_mapping[t]} is past the index cache "
                             f"({num_blocks} blocks x {ispec.block_size} slots)")
    return _write_index_k(index_cache, index_key, slot_mapping, ispec)


# ---------------------------------------------------------------- selection (every implementation)

def visible_blocks(token_positions, block_size: int, max_blocks: int):
    """[num_tokens] int32: blocks each token may see (0 for padding), within the table."""
    return jnp.where(token_positions >= 0,
                     jnp.minimum(token_positions // block_size + 1, max_blocks), 0)


def priority_keys(ispec: IndexerSpec, scores, nvis):
    """`interop.indexer.priority_keys` in jnp: scores float32 [..., T, W] (NaN allowed), nvis
    [T] -> int32 [..., T, W]."""
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    mag = bits & MAGNITUDE_MASK
    key = jnp.where((bits >= 0) | (mag == 0), mag, -1 - mag)
    key = jnp.where(jnp.isnan(scores), PRIORITY_NAN, key)
    block = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    n = nvis[:, None]
    key = jnp.where(block >= n - ispec.local_blocks, PRIORITY_LOCAL, key)
    key = jnp.where(block < ispec.init_blocks, PRIORITY_INIT, key)
    return jnp.where(block < n, key, PRIORITY_HIDDEN)


def select_topk(ispec: IndexerSpec, scores, nvis):
    """The contract's selection from scores float32 [H, T, W] (entries past nvis [T] are
    ignored, whatever they hold): int32 [H, T, topk_blocks]."""
    key = priority_keys(ispec, scores, nvis)
    k = ispec.topk_blocks
    width = key.shape[-1]
    # lax.top_k puts the lower index first among equal values: equal priority keys (which
    # are equal priorities, ties included) go to the smaller block, as the contract says.
    _, order = lax.top_k(key, min(k, width))
    if width < k:
        order = jnp.pad(order, ((0, 0), (0, 0), (0, k - width)))
    return jnp.where(jnp.arange(k) < nvis[:, None], order, -1).astype(jnp.int32)


# ---------------------------------------------------------------- "xla" scores

def index_scores_xla(ispec: IndexerSpec, index_query, index_cache, token_to_req,
                     token_positions, block_table, *, token_chunk: int = 8):
    """float32 [H, T, max_blocks]: each block's max over its keys j <= position of q . k
    (NaN when one is NaN or the page lies outside the cache); entries of blocks a token may
    not see are unspecified (`select_topk` ignores them)."""
    num_blocks, bs = index_cache.shape[0], ispec.block_size
    num_reqs, max_blocks = block_table.shape
    key_pos = (jnp.arange(max_blocks, dtype=jnp.int32)[:, None] * bs
               + jnp.arange(bs, dtype=jnp.int32))

    def one_token(args):
        q, req, position = args                                   # [H, D], [], []
        pages = block_table[jnp.clip(req, 0, num_reqs - 1)]
        page_ok = (pages >= 0) & (pages < num_blocks)
        keys = index_cache[jnp.where(page_ok, pages, 0)].astype(q.dtype)   # [W, bs, D]
        dots = jnp.einsum("hd,wsd->hws", q, keys, preferred_element_type=jnp.float32)
        seen = key_pos <= position
        best = jnp.where(seen, dots, -jnp.inf).max(-1)
        bad = (seen & jnp.isnan(dots)).any(-1) | ~page_ok
        return jnp.where(bad, jnp.nan, best)                      # [H, W]

    scores = lax.map(one_token, (index_query, token_to_req, token_positions),
                     batch_size=token_chunk)
    return jnp.swapaxes(scores, 0, 1)


# ---------------------------------------------------------------- "pallas" scores

def plan_index_tiles(query_start_loc, num_tiles: int, tile_tokens: int):
    """(tile_req, tile_start): int32 [num_tiles] each, the request and first token of every
    scoring tile (`tile_tokens` consecutive tokens of one request). Tiles past the batch's
    get an empty range (start = the request's end)."""
    qsl = query_start_loc.astype(jnp.int32)
    num_reqs = qsl.shape[0] - 1
    per_req = (qsl[1:] - qsl[:-1] + tile_tokens - 1) // tile_tokens
    ends = jnp.cumsum(per_req)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    req = jnp.minimum(jnp.searchsorted(ends, tile, side="right"), num_reqs - 1).astype(jnp.int32)
    start = qsl[req] + (tile - (ends[req] - per_req[req])) * tile_tokens
    return req, jnp.where(tile < ends[-1], start, qsl[req + 1])


def _score_kernel(tile_req_ref, tile_start_ref, qsl_ref, pos_ref, table_ref, q_ref, cache_ref,
                  out_ref, *, tile_tokens: int, heads: int, block_size: int, splits: int):
    """One (tile, split) program: q_ref [T, H, D], cache_ref [num_blocks, bs, D] and
    out_ref [H, T, max_blocks] whole; writes the scores of the tile's tokens for its blocks."""
    tile, split = pl.program_id(0), pl.program_id(1)
    num_blocks = cache_ref.shape[0]
    max_blocks = table_ref.shape[1]
    req = tile_req_ref[tile]
    start = tile_start_ref[tile]
    end = qsl_ref[req + 1]

    @pl.when(start < end)
    def _():
        live = start + jnp.arange(tile_tokens, dtype=jnp.int32) < end        # [TT]
        pos = plgpu.load(pos_ref.at[pl.ds(start, tile_tokens)], mask=live, other=-1)
        pos = jnp.where(live, pos, -1)
        last = jnp.max(pos)
        tile_blocks = jnp.where(last >= 0, jnp.minimum(last // block_size + 1, max_blocks), 0)
        chunk = (tile_blocks + splits - 1) // splits
        lo = split * chunk
        hi = jnp.minimum(lo + chunk, tile_blocks)
        dmask = jnp.broadcast_to(live[:, None], (tile_tokens, q_ref.shape[-1]))
        # (A Python int index trips the interpreter's indexer: heads are int32 scalars.)
        qs = [plgpu.load(q_ref.at[pl.ds(start, tile_tokens), jnp.int32(h), :], mask=dmask,
                         other=jnp.zeros((), q_ref.dtype)) for h in range(heads)]
        offs = jnp.arange(block_size, dtype=jnp.int32)

        def body(b, carry):
            page = table_ref[req, b]
            page_ok = (page >= 0) & (page < num_blocks)
            # Keys past the tile's last token are never read (they may hold anything).
            rows = (b * block_size + offs <= last) & page_ok
            k = plgpu.load(cache_ref.at[jnp.where(page_ok, page, 0)],
                           mask=jnp.broadcast_to(rows[:, None], (block_size, cache_ref.shape[-1])),
                           other=jnp.zeros((), cache_ref.dtype))
            seen = b * block_size + offs[None, :] <= pos[:, None]            # [TT, bs]
            for h in range(heads):
                s = plgpu.dot(qs[h], k.astype(qs[h].dtype), trans_b=True)    # [TT, bs] f32
                best = jnp.max(jnp.where(seen, s, -jnp.inf), axis=1)
                bad = jnp.max(jnp.where(seen & (s != s), 1, 0), axis=1) > 0
                best = jnp.where(bad | ~page_ok, jnp.nan, best)
                plgpu.store(out_ref.at[jnp.int32(h), pl.ds(start, tile_tokens), b], best, mask=live)
            return carry

        lax.fori_loop(lo, hi, body, 0)


def index_scores_pallas(ispec: IndexerSpec, index_query, index_cache, token_positions,
                        block_table, query_start_loc, *, num_warps: int = 4,
                        num_stages: int = 2, interpret: bool | None = None):
    """Same result as `index_scores_xla` (see there), from the Pallas scoring kernel."""
    num_tokens, heads, _ = index_query.shape
    num_reqs, max_blocks = block_table.shape
    tile_tokens = max(MIN_ROWS, index_tile_tokens(heads))
    num_tiles = index_max_tiles(num_tokens, num_reqs, tile_tokens)
    splits = index_num_splits(num_tiles, max_blocks)
    tile_req, tile_start = plan_index_tiles(query_start_loc, num_tiles, tile_tokens)
    # Every tile may load tile_tokens rows from its start: pad the token axis so none runs off.
    q = jnp.pad(index_query, ((0, tile_tokens), (0, 0), (0, 0)))
    pos = jnp.pad(token_positions[:num_tokens].astype(jnp.int32), (0, tile_tokens),
                  constant_values=-1)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    kernel = functools.partial(_score_kernel, tile_tokens=tile_tokens, heads=heads,
                               block_size=ispec.block_size, splits=splits)
    args = (tile_req, tile_start, query_start_loc.astype(jnp.int32), pos,
            block_table.astype(jnp.int32), q, index_cache)
    whole = [pl.BlockSpec(x.shape, lambda *_, n=x.ndim: (0,) * n) for x in args]
    out_shape = (heads, num_tokens + tile_tokens, max_blocks)
    scores = pl.pallas_call(
        kernel,
        grid=(num_tiles, splits),
        in_specs=whole,
        out_specs=pl.BlockSpec(out_shape, lambda *_: (0, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"index_scores_tt{tile_tokens}_splits{splits}",
    )(*args)
    return scores[:, :num_tokens]


# ---------------------------------------------------------------- the public call

def _index_topk(ispec, index_query, index_cache, token_to_req, token_positions, block_table,
                query_start_loc, *, implementation):
    num_tokens = index_query.shape[0]
    positions = token_positions[:num_tokens].astype(jnp.int32)
    table = block_table.astype(jnp.int32)
    if implementation == "xla":
        scores = index_scores_xla(ispec, index_query, index_cache,
                                  token_to_req[:num_tokens].astype(jnp.int32), positions, table)
    elif implementation == "tpu":
        tile_tokens = index_tile_tokens(ispec.num_index_heads)
        tiles = plan_index_tiles(query_start_loc, index_max_tiles(num_tokens, table.shape[0],
                                                                  tile_tokens), tile_tokens)
        scores = index_scores_tpu(index_query, index_cache, positions, table,
                                  query_start_loc.astype(jnp.int32), *tiles,
                                  block_size=ispec.block_size, tile_tokens=tile_tokens)
    else:
        scores = index_scores_pallas(ispec, index_query, index_cache, positions, table,
                                     query_start_loc)
    return select_topk(ispec, scores, visible_blocks(positions, ispec.block_size,
                                                     table.shape[1]))


_index_topk_jit = jax.jit(_index_topk, static_argnames=("ispec", "implementation"))


def index_topk(ispec: IndexerSpec, index_query, index_cache, metadata, *,
               implementation: str | None = None):
    """The indexer's block selection for a decode-first batch (contract, section 6). Jitted
    (the spec and the implementation static); call it directly or inside a jitted step.

    Args:
      ispec: the indexer's static facts.
      index_query: [num_tokens, num_index_heads, index_head_size] bfloat16 / float16.
      index_cache: (num_blocks, block_size, index_head_size), the spec's storage dtype.
      metadata: JAX-flavour SparseMetadata (`interop.to_jax`): token_positions, token_to_req,
        block_table and query_start_loc are read (traced).
      implementation: one of INDEX_IMPLEMENTATIONS ("pallas", "tpu", "xla"); default:
        `default_index_implementation()`.
    Returns: int32 [num_index_heads, num_tokens, topk_blocks], the `topk_indices` of sparse
      attention: per row the min(topk_blocks, visible blocks) highest-priority blocks in
      descending priority (equal priority: smaller block first), then -1; padding tokens all -1.
    """
    implementation = implementation or default_index_implementation()
    if implementation not in INDEX_IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is not available for index_topk; "
                         f"expected one of {', '.join(map(repr, INDEX_IMPLEMENTATIONS))}")
    fields = (metadata.token_to_req, metadata.token_positions, metadata.block_table,
              metadata.query_start_loc)
    check_index_inputs(ispec, index_query, index_cache, *fields)
    return _index_topk_jit(ispec, index_query, index_cache, *fields,
                           implementation=implementation)
