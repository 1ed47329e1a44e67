"""The lightning indexer in JAX (contract, section 6): index-key cache writes, block scores and
the top-k selection that sparse attention takes.

Three implementations, one priority order:
- "xla": plain `jax.numpy`. Each token gathers its request's visible pages and takes, per
  index head and block, the largest dot product over the block's keys j <= position
  (`lax.map` over tokens in chunks, so only `token_chunk` tokens' pages are alive at once).
- "pallas": a fused Pallas kernel (Triton backend on a GPU, interpret mode elsewhere). A
  program takes one tile of a request's tokens (`index_tile_tokens`: 64 rows of (token, index
  head), heads padded to a power of two) and a range of its visible blocks: per index-key page
  one [rows, D] x [D, block_size] dot (f32 accumulation) for every head and token, masked to
  keys j <= position and max-reduced, then each row's running top-k of (priority key, block)
  candidates (`index_split_slots`), kept in registers: no score
  matrix is written. Tiles never straddle requests; their (request, first token) come from
  `plan_index_tiles` (XLA, static shapes), so one launch serves a mixed decode-first batch.
  Small grids (decode) split each tile's blocks over programs (`index_num_splits`); XLA sorts
  the splits' candidates (`merge_candidates`).
- "tpu": the Pallas TPU kernel of `indexer_tpu.py` (interpret mode off a TPU), on the same
  tile plan: one program per tile, its pages DMA'd from HBM through a VMEM ring.
Selection of "xla" and "tpu" (`select_topk`, XLA): each visible block's 32-bit priority key
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
from interop.tiling import (index_max_tiles, index_num_splits, index_split_slots,
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


def block_priority(ispec: IndexerSpec, scores, block, nvis):
    """`interop.indexer.priority_keys` elementwise in jnp (also inside the Pallas kernel):
    float32 scores (NaN allowed), block ids and visible counts, broadcast together -> int32."""
    bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
    mag = bits & MAGNITUDE_MASK
    key = jnp.where((bits >= 0) | (mag == 0), mag, -1 - mag)
    key = jnp.where(scores != scores, PRIORITY_NAN, key)
    key = jnp.where(block >= nvis - ispec.local_blocks, PRIORITY_LOCAL, key)
    key = jnp.where(block < ispec.init_blocks, PRIORITY_INIT, key)
    return jnp.where(block < nvis, key, PRIORITY_HIDDEN)


def priority_keys(ispec: IndexerSpec, scores, nvis):
    """`interop.indexer.priority_keys` in jnp: scores float32 [..., T, W] (NaN allowed), nvis
    [T] -> int32 [..., T, W]."""
    block = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return block_priority(ispec, scores, block, nvis[:, None])


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


# ---------------------------------------------------------------- "pallas": fused scores + top-k

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


def _topk_kernel(tile_req_ref, tile_start_ref, qsl_ref, pos_ref, table_ref, q_ref, cache_ref,
                 key_ref, block_ref, *, ispec: IndexerSpec, tile_tokens: int, heads: int,
                 splits: int, slots: int):
    """One (tile, split) program. q_ref [rows_total, D] and pos_ref [rows_total]: one row per
    (token, padded index head), token-major; cache_ref [num_blocks, bs, D] whole; key_ref /
    block_ref [splits, rows_total, slots]: the program's candidates for its tile's rows (every
    row of a run tile is written, empty slots with PRIORITY_HIDDEN)."""
    tile, split = pl.program_id(0), pl.program_id(1)
    num_blocks, block_size = cache_ref.shape[0], ispec.block_size
    max_blocks = table_ref.shape[1]
    rows = tile_tokens * heads
    req = tile_req_ref[tile]
    start = tile_start_ref[tile]
    end = qsl_ref[req + 1]

    @pl.when(start < end)
    def _():
        r0 = start * heads
        live = r0 + jnp.arange(rows, dtype=jnp.int32) < end * heads           # [rows]
        pos = plgpu.load(pos_ref.at[pl.ds(r0, rows)], mask=live, other=-1)
        pos = jnp.where(live, pos, -1)
        nvis = jnp.where(pos >= 0, jnp.minimum(pos // block_size + 1, max_blocks), 0)
        tile_blocks = jnp.max(nvis)
        chunk = (tile_blocks + splits - 1) // splits
        lo = split * chunk
        hi = jnp.minimum(lo + chunk, tile_blocks)
        dim = q_ref.shape[-1]
        q = plgpu.load(q_ref.at[pl.ds(r0, rows), :],
                       mask=jnp.broadcast_to(live[:, None], (rows, dim)),
                       other=jnp.zeros((), q_ref.dtype))
        offs = jnp.arange(block_size, dtype=jnp.int32)
        last = jnp.max(pos)

        def body(b, carry):
            keys, blocks = carry                                              # [rows, slots]
            page = table_ref[req, b]
            page_ok = (page >= 0) & (page < num_blocks)
            # Keys past the tile's last token are never read (they may hold anything).
            key_ok = (b * block_size + offs <= last) & page_ok
            k = plgpu.load(cache_ref.at[jnp.where(page_ok, page, 0)],
                           mask=jnp.broadcast_to(key_ok[:, None], (block_size, dim)),
                           other=jnp.zeros((), cache_ref.dtype))
            s = plgpu.dot(q, k.astype(q.dtype), trans_b=True)                # [rows, bs] f32
            seen = b * block_size + offs[None, :] <= pos[:, None]
            best = jnp.max(jnp.where(seen, s, -jnp.inf), axis=1)
            bad = jnp.max(jnp.where(seen & (s != s), 1, 0), axis=1) > 0
            best = jnp.where(bad | ~page_ok, jnp.nan, best)
            new = block_priority(ispec, best, b, nvis)                        # [rows]
            # Blocks arrive in ascending order: a new block displaces the row's worst entry
            # (lowest key; among equal keys the larger block) only with a strictly higher
            # key, so equal keys keep the smaller block, as the contract says.
            worst = jnp.min(keys, axis=1)
            at_worst = keys == worst[:, None]
            worst_block = jnp.max(jnp.where(at_worst, blocks, -1 - slots), axis=1)
            take = at_worst & (blocks == worst_block[:, None]) & (new > worst)[:, None]
            return (jnp.where(take, new[:, None], keys), jnp.where(take, b, blocks))

        # Distinct negative block ids for the empty slots: each step replaces exactly one.
        empty = (jnp.full((rows, slots), PRIORITY_HIDDEN, jnp.int32),
                 jnp.broadcast_to(-1 - jnp.arange(slots, dtype=jnp.int32)[None, :],
                                  (rows, slots)))
        keys, blocks = lax.fori_loop(lo, hi, body, empty)
        smask = jnp.broadcast_to(live[:, None], (rows, slots))
        plgpu.store(key_ref.at[split, pl.ds(r0, rows), :], keys, mask=smask)
        plgpu.store(block_ref.at[split, pl.ds(r0, rows), :], blocks, mask=smask)


def merge_candidates(ispec: IndexerSpec, keys, blocks, nvis):
    """The selection from candidate lists: keys / blocks int32 [H, T, C] (priority keys and
    block ids in any order, PRIORITY_HIDDEN: empty), nvis [T] -> int32 [H, T, topk_blocks],
    highest key first, equal keys by smaller block, -1 past the candidates and for padding."""
    keys = jnp.where(nvis[:, None] > 0, keys, PRIORITY_HIDDEN)
    k = ispec.topk_blocks
    if keys.shape[-1] < k:
        pad = ((0, 0), (0, 0), (0, k - keys.shape[-1]))
        keys = jnp.pad(keys, pad, constant_values=PRIORITY_HIDDEN)
        blocks = jnp.pad(blocks, pad, constant_values=-1)
    # ~key reverses the int32 order without overflow: ascending (~key, block) is the contract's.
    order_key, block = lax.sort((~keys, blocks), dimension=-1, num_keys=2)
    return jnp.where(~order_key[..., :k] > PRIORITY_HIDDEN, block[..., :k], -1).astype(jnp.int32)


def index_topk_pallas(ispec: IndexerSpec, index_query, index_cache, token_positions,
                      block_table, query_start_loc, *, num_splits: int | None = None,
                      num_warps: int = 4, num_stages: int = 2,
                      interpret: bool | None = None):
    """The selection of `index_topk` from the fused Pallas kernel (Triton backend): per tile of
    `tile_tokens` tokens x padded index heads (one [rows, D] x [D, block_size] dot per page,
    f32 accumulation) and per split of its blocks, a running top-k of `index_split_slots`
    candidates per row kept in registers; `merge_candidates` (XLA) orders the splits' lists.
    HBM workspace: keys and blocks int32 [splits, (num_tokens + tile_tokens) * heads, slots].
    num_splits: block ranges per tile; None: `index_num_splits` of the grid and table."""
    num_tokens, heads, dim = index_query.shape
    num_reqs, max_blocks = block_table.shape
    heads_p = next_power_of_2(heads)
    tile_tokens = index_tile_tokens(heads)   # rows = tile_tokens * heads_p >= 64
    num_tiles = index_max_tiles(num_tokens, num_reqs, tile_tokens)
    splits = num_splits or index_num_splits(num_tiles, max_blocks)
    slots = index_split_slots(ispec.topk_blocks, max_blocks, splits)
    tile_req, tile_start = plan_index_tiles(query_start_loc, num_tiles, tile_tokens)
    # Rows (token, padded head), token-major; every tile may touch tile_tokens tokens past its
    # start, so the token axis is padded by that many.
    padded = num_tokens + tile_tokens
    q = jnp.pad(index_query, ((0, tile_tokens), (0, heads_p - heads), (0, 0)))
    pos = jnp.pad(token_positions[:num_tokens].astype(jnp.int32), (0, tile_tokens),
                  constant_values=-1)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    kernel = functools.partial(_topk_kernel, ispec=ispec, tile_tokens=tile_tokens,
                               heads=heads_p, splits=splits, slots=slots)
    args = (tile_req, tile_start, query_start_loc.astype(jnp.int32),
            jnp.repeat(pos, heads_p), block_table.astype(jnp.int32),
            q.reshape(padded * heads_p, dim), index_cache)
    whole = [pl.BlockSpec(x.shape, lambda *_, n=x.ndim: (0,) * n) for x in args]
    out_shape = (splits, padded * heads_p, slots)
    out_spec = pl.BlockSpec(out_shape, lambda *_: (0, 0, 0))
    keys, blocks = pl.pallas_call(
        kernel,
        grid=(num_tiles, splits),
        in_specs=whole,
        out_specs=(out_spec, out_spec),
        out_shape=(jax.ShapeDtypeStruct(out_shape, jnp.int32),) * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"index_topk_tt{tile_tokens}_h{heads_p}_splits{splits}",
    )(*args)

    def per_row(x):  # [splits, rows] -> [H, T, splits * slots]
        x = x.reshape(splits, padded, heads_p, slots)[:, :num_tokens, :heads]
        return jnp.transpose(x, (2, 1, 0, 3)).reshape(heads, num_tokens, splits * slots)

    nvis = visible_blocks(token_positions[:num_tokens], ispec.block_size, max_blocks)
    return merge_candidates(ispec, per_row(keys), per_row(blocks), nvis)


# ---------------------------------------------------------------- the public call

def _index_topk(ispec, index_query, index_cache, token_to_req, token_positions, block_table,
                query_start_loc, *, implementation):
    num_tokens = index_query.shape[0]
    positions = token_positions[:num_tokens].astype(jnp.int32)
    table = block_table.astype(jnp.int32)
    if implementation == "pallas":
        return index_topk_pallas(ispec, index_query, index_cache, positions, table,
                                 query_start_loc)
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
