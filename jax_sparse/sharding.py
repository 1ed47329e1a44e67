"""`sparse_attention` and `write_kv` on a device mesh: tensor parallelism over KV heads, data
parallelism over requests, through `jax.shard_map` around the single-device op.

Tensor parallelism (the mesh axis `tp_axis`, size tp): KV head g and its query heads live on
one device. The query is sharded on its head axis, the cache on its KV-head axis, `topk_indices`
on axis 0 and per-slot scales on axis 0; each device runs the op with a spec of num_heads / tp
and num_kv_heads / tp. A GQA group never spans devices (tp must divide num_kv_heads), so no
collective is needed: the output stays sharded on its head axis.

Data parallelism (the mesh axis `dp_axis`, size dp): as in DP serving, each rank owns its batch,
its cache pages and its metadata. The global arrays are the ranks' arrays concatenated, each
rank's part padded to a common size:
- tokens: query rows, `topk_indices`' token axis, key / value / slot_mapping rows;
- requests: block_table rows, seq_lens (and the other per-request fields);
- pages: the cache's page axis, and the slot axis of per-slot scales (rank d's slots are its own
  pages' slots).
Indices stay shard-LOCAL: page ids in a block table and slots in a slot mapping count from the
rank's first page, token_to_req from its first request. Per-rank counts (num_decode_tokens...)
become arrays of length dp. `pack_dp_metadata` builds that metadata from one NumPy
`build_metadata` result per rank. Rank d's output rows are rows [d * T, (d + 1) * T) of the
result (T = query rows per rank); its padding rows are zeros.

Both at once: a 2-D mesh such as ("dp", "tp") = (2, 2). Either axis may be None (not sharded);
other mesh axes replicate. `kv_cache_sharding` says where the cache lives; the metadata goes
on NamedSharding(mesh, P(dp_axis)). Meshes with Auto axes (`Mesh`'s default) or Explicit ones
(`jax.make_mesh`'s) both work: arguments are resharded to the layout above where needed.
Everything is usable under an outer `jax.jit`; the shard_map bodies are the single-device ops,
so every implementation runs sharded (Pallas kernels included, hence check_vma=False: the
per-device body is a plain kernel call with no collective). `jax.shard_map` and its check_vma
keyword are the same in jax 0.10 and 0.11.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from interop import (KV_CACHE_STRIDE_ORDERS, SparseAttentionSpec, SparseMetadata,
                     check_prefill_algorithm)
from interop.metadata import ARRAY_FIELDS, COUNT_FIELDS

from .api import _attention
from .cache import prepare_write, scatter_kv
from .validation import (check_attention_inputs, check_jax_flavour, check_metadata, check_scale,
                         check_slots_when_run, check_static, check_write_inputs)


def mesh_sizes(mesh: Mesh, dp_axis: str | None, tp_axis: str | None) -> tuple[int, int]:
    """(dp, tp): the sizes of the two mesh axes, 1 for an axis given as None."""
    if dp_axis is not None and dp_axis == tp_axis:
        raise ValueError(f"dp_axis and tp_axis are both {dp_axis!r}: they must be different "
                         "mesh axes")
    sizes = []
    for role, axis in (("dp_axis", dp_axis), ("tp_axis", tp_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(f"{role} {axis!r} is not an axis of the mesh; its axes are "
                             f"{tuple(mesh.axis_names)} (pass {role}=None to leave that "
                             "dimension unsharded)")
        sizes.append(1 if axis is None else int(mesh.shape[axis]))
    return sizes[0], sizes[1]


def shard_spec(spec: SparseAttentionSpec, tp: int) -> SparseAttentionSpec:
    """The spec each of tp tensor-parallel devices runs: num_heads / tp, num_kv_heads / tp."""
    if spec.num_kv_heads % tp:
        raise ValueError(f"the tensor-parallel axis has {tp} devices, which must divide "
                         f"num_kv_heads ({spec.num_kv_heads}): a GQA group cannot span devices")
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp,
                               num_kv_heads=spec.num_kv_heads // tp)


def _cache_partition(spec: SparseAttentionSpec, dp_axis, tp_axis) -> P:
    """The physical cache: pages (logical axis 0) on dp, KV heads (logical axis 3) on tp."""
    order = KV_CACHE_STRIDE_ORDERS[spec.kv_cache_layout]
    axes = [None] * 5
    axes[order.index(0)], axes[order.index(3)] = dp_axis, tp_axis
    return P(*axes)


def kv_cache_sharding(mesh: Mesh, spec: SparseAttentionSpec, *, dp_axis: str | None = "dp",
                      tp_axis: str | None = "tp") -> NamedSharding:
    """Where the physical cache lives: each rank's pages on its dp_axis devices, each KV head
    on its tp_axis device (`jax.device_put(cache, kv_cache_sharding(mesh, spec))`)."""
    mesh_sizes(mesh, dp_axis, tp_axis)
    return NamedSharding(mesh, _cache_partition(spec, dp_axis, tp_axis))


def _check_divisible(dp: int, **sizes) -> None:
    """Every (name: (size, what)) splits into dp equal rank parts."""
    for name, (size, what) in sizes.items():
        if size % dp:
            raise ValueError(f"{name} has {size} {what}, not a multiple of the {dp} "
                             "data-parallel ranks: concatenate each rank's part padded to a "
                             "common size")


def _scales(spec, num_blocks, k_scale, v_scale, dp_axis, tp_axis):
    """The checked scales and their partitions: one scale replicated, per-slot scales on
    (KV heads, the ranks' slots)."""
    scales = [check_scale(name, scale, spec, num_blocks)
              for name, scale in (("k_scale", k_scale), ("v_scale", v_scale))]
    return scales, [P() if s is None or s.ndim == 1 else P(tp_axis, dp_axis) for s in scales]


def _shard_map(body, mesh, in_specs, out_specs, args):
    """body over the mesh's shards of args. Arguments are first placed on their in_specs'
    Explicit mesh axes (`jax.make_mesh`'s default type), where shard_map requires an argument's
    sharding to match its in_spec; jit places them on Auto axes itself."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = lambda axis: axis if types.get(axis) == AxisType.Explicit else None  # noqa: E731
    if AxisType.Explicit in types.values():
        args = [jax.sharding.reshard(x, NamedSharding(mesh, P(*map(explicit, spec))))
                for x, spec in zip(args, in_specs)]
    # The bodies are single-device kernel calls (Pallas included) with no collective: nothing
    # for the varying-manual-axes check to verify, and Pallas calls do not carry its types.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


@functools.partial(jax.jit, static_argnames=(
    "mesh", "spec", "dp_axis", "tp_axis", "implementation", "prefill_algorithm", "config",
    "num_splits", "num_warps", "num_stages"))
def _sharded_attention(mesh, spec, query, kv_cache, topk_indices, token_to_req, token_positions,
                       block_table, num_decode_tokens, k_scale, v_scale, *, dp_axis, tp_axis,
                       implementation, prefill_algorithm, config, num_splits, num_warps,
                       num_stages):
    check_prefill_algorithm(prefill_algorithm)
    dp, tp = mesh_sizes(mesh, dp_axis, tp_axis)
    local = shard_spec(spec, tp)
    num_blocks = check_attention_inputs(spec, query, kv_cache, topk_indices, token_to_req,
                                        token_positions, block_table)
    tokens = "token rows"
    _check_divisible(dp, query=(query.shape[0], tokens), kv_cache=(num_blocks, "pages"),
                     topk_indices=(topk_indices.shape[1], tokens),
                     **{"metadata.token_to_req": (token_to_req.shape[0], tokens),
                        "metadata.token_positions": (token_positions.shape[0], tokens),
                        "metadata.block_table": (block_table.shape[0], "request rows")})
    if np.shape(num_decode_tokens) != (dp,):
        raise ValueError(f"metadata.num_decode_tokens has shape {np.shape(num_decode_tokens)}: "
                         f"expected ({dp},), one count per data-parallel rank (build the "
                         "metadata with jax_sparse.pack_dp_metadata)")
    scales, scale_parts = _scales(spec, num_blocks, k_scale, v_scale, dp_axis, tp_axis)

    def body(query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
             num_decode_tokens, k_scale, v_scale):
        return _attention(local, query, kv_cache, topk_indices, token_to_req, token_positions,
                          block_table, k_scale, v_scale, num_decode_tokens[0],
                          implementation=implementation, prefill_algorithm=prefill_algorithm,
                          config=config, num_splits=num_splits, num_warps=num_warps,
                          num_stages=num_stages)

    in_specs = (P(dp_axis, tp_axis), _cache_partition(spec, dp_axis, tp_axis),
                P(tp_axis, dp_axis), P(dp_axis), P(dp_axis), P(dp_axis), P(dp_axis),
                *scale_parts)
    args = (query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
            num_decode_tokens, *scales)
    return _shard_map(body, mesh, in_specs, P(dp_axis, tp_axis), args)


def sharded_sparse_attention(mesh: Mesh, spec: SparseAttentionSpec, query, kv_cache,
                             topk_indices, metadata: SparseMetadata, *, dp_axis: str | None = "dp",
                             tp_axis: str | None = "tp", k_scale=None, v_scale=None,
                             implementation: str | None = None, prefill_algorithm: str = "auto",
                             config=None, num_splits: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None):
    """`sparse_attention` on a mesh: KV heads over `tp_axis`, DP ranks' batches over `dp_axis`.

    Jitted (mesh, spec, axes and knobs static); call it directly or inside a jitted step.
    dp / tp below are the sizes of those mesh axes (1 for an axis given as None). Rank d's part
    of each token, request or page axis is the d-th of dp equal slices (module docstring).

    Args:
      mesh: a `jax.sharding.Mesh` holding dp_axis and tp_axis (other axes replicate).
      spec: the layer's whole (unsharded) spec; tp must divide num_kv_heads.
      query: [dp * T, num_heads, head_size]; sharded (dp_axis, tp_axis).
      kv_cache: the physical cache of dp * num_blocks pages (each rank's pages in turn), sharded
        on pages (dp_axis) and KV heads (tp_axis).
      topk_indices: [num_kv_heads, dp * Tk, topk_blocks] int, Tk >= T rows per rank; sharded
        (tp_axis, dp_axis). Logical blocks of the rank's own requests.
      metadata: `pack_dp_metadata`'s result (NumPy or JAX leaves): token_to_req,
        token_positions [dp * T], block_table [dp * R, max_blocks] (rank-local page ids) and
        num_decode_tokens [dp] are read, each sharded on dp_axis.
      k_scale / v_scale: FP8 caches only: None, one scale (replicated) or [num_kv_heads,
        dp * num_blocks * block_size] float32 by slot, sharded (tp_axis, dp_axis).
      implementation, prefill_algorithm, config, num_splits / num_warps / num_stages: as in
        `sparse_attention`, for every shard.
    Returns: [dp * T, num_heads, head_size] in the query dtype, sharded (dp_axis, tp_axis):
      rank d's rows are [d * T, (d + 1) * T), each device holding its KV heads' query heads.
    """
    check_jax_flavour(query=query, kv_cache=kv_cache, topk_indices=topk_indices,
                      k_scale=k_scale, v_scale=v_scale)
    check_metadata(metadata)
    check_static(implementation=implementation, prefill_algorithm=prefill_algorithm,
                 config=config, num_splits=num_splits, num_warps=num_warps,
                 num_stages=num_stages)
    return _sharded_attention(
        mesh, spec, query, kv_cache, topk_indices, metadata.token_to_req,
        metadata.token_positions, metadata.block_table, metadata.num_decode_tokens, k_scale,
        v_scale, dp_axis=dp_axis, tp_axis=tp_axis, implementation=implementation,
        prefill_algorithm=prefill_algorithm, config=config, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("mesh", "spec", "dp_axis", "tp_axis",
                                             "check_when_run"),
                   donate_argnames=("kv_cache",))
def _sharded_write_kv(mesh, kv_cache, key, value, slot_mapping, spec, k_scale, v_scale, *,
                      dp_axis, tp_axis, check_when_run):
    dp, tp = mesh_sizes(mesh, dp_axis, tp_axis)
    local = shard_spec(spec, tp)
    num_blocks = check_write_inputs(spec, kv_cache, key, value, slot_mapping)
    num_tokens = key.shape[0]
    slot_mapping = slot_mapping[:num_tokens]  # vLLM pads slot_mapping: ignored
    _check_divisible(dp, kv_cache=(num_blocks, "pages"), key=(num_tokens, "token rows"))
    if check_when_run:  # rank-local slots: each rank's are below its own pages' slots
        check_slots_when_run(slot_mapping, num_blocks // dp * spec.block_size,
                             "the rank's pages")
    scales, scale_parts = _scales(spec, num_blocks, k_scale, v_scale, dp_axis, tp_axis)

    def body(kv_cache, key, value, slot_mapping, k_scale, v_scale):
        return scatter_kv(kv_cache, key, value, slot_mapping, local, k_scale, v_scale)

    cache_part = _cache_partition(spec, dp_axis, tp_axis)
    in_specs = (cache_part, P(dp_axis, tp_axis), P(dp_axis, tp_axis), P(dp_axis), *scale_parts)
    args = (kv_cache, key, value, slot_mapping, *scales)
    return _shard_map(body, mesh, in_specs, cache_part, args)


def sharded_write_kv(mesh: Mesh, kv_cache, key, value, slot_mapping, spec: SparseAttentionSpec,
                     k_scale=None, v_scale=None, *, dp_axis: str | None = "dp",
                     tp_axis: str | None = "tp", checks: bool | None = None):
    """`write_kv` on a mesh, with `sharded_sparse_attention`'s layout; returns the new cache.

    Args:
      mesh, dp_axis, tp_axis, spec: as in `sharded_sparse_attention`.
      kv_cache: the physical cache of dp * num_blocks pages, sharded on pages and KV heads.
        Donated: each device writes into its own shard's buffer (use the returned array); a
        call that raises consumes nothing.
      key / value: [dp * T, num_kv_heads, head_size], sharded (dp_axis, tp_axis).
      slot_mapping: [>= dp * T] int, rank-local slots (`pack_dp_metadata`'s slot_mapping);
        negative: not written; >= num_blocks * block_size (the rank's own pages): never
        written, and a ValueError as in `write_kv` (its check mode included). Sharded on
        dp_axis; entries past dp * T are ignored.
      k_scale / v_scale: as in `sharded_sparse_attention`.
      checks: as in `write_kv`.
    Returns: the updated cache, sharded as `kv_cache`.
    """
    dp, _ = mesh_sizes(mesh, dp_axis, tp_axis)
    check_when_run = prepare_write(
        kv_cache, key, value, slot_mapping, spec, k_scale, v_scale, checks=checks,
        num_slots=lambda num_blocks: num_blocks // dp * spec.block_size)
    return _sharded_write_kv(mesh, kv_cache, key, value, slot_mapping, spec, k_scale, v_scale,
                             dp_axis=dp_axis, tp_axis=tp_axis, check_when_run=check_when_run)


# --- the packed data-parallel metadata (host side) --------------------------------------------

# How each array field is padded: rows past a rank's own are inert (a padding token has
# position -1 and slot -1, so it attends and writes nothing; a padding request is empty).
_TOKEN_PAD = {"token_to_req": 0, "token_positions": -1, "slot_mapping": -1}
_REQUEST_PAD = {"seq_lens": 0, "context_lens": 0}
_OFFSET_FIELDS = ("query_start_loc", "seq_start_loc")  # [num_reqs + 1]: repeat the total
assert set(ARRAY_FIELDS) == {*_TOKEN_PAD, *_REQUEST_PAD, *_OFFSET_FIELDS, "block_table"}, \
    "a new metadata array field needs its padding rule here"


def _pad_rows(x: np.ndarray, rows: int, fill) -> np.ndarray:
    out = np.full((rows, *x.shape[1:]), fill, x.dtype)
    out[:x.shape[0]] = x
    return out


def pack_dp_metadata(shards, *, num_tokens: int | None = None, num_reqs: int | None = None,
                     max_blocks: int | None = None) -> SparseMetadata:
    """One NumPy `build_metadata` result per data-parallel rank -> the packed metadata that
    `sharded_sparse_attention` reads (NumPy leaves; jit moves them, or
    `jax.device_put(packed, NamedSharding(mesh, P(dp_axis)))` places each rank's part).

    Each rank's arrays are padded to common sizes and concatenated: token fields to num_tokens
    rows (padding tokens: position -1, slot -1, request 0), request fields to num_reqs rows
    (empty requests), block tables to max_blocks columns (-1). Indices stay rank-local. Every
    count becomes an int32 array of length dp (rank d's count at d).

    Args:
      shards: a sequence of dp NumPy-flavour SparseMetadata, rank 0 first.
      num_tokens / num_reqs / max_blocks: the common sizes (default: the largest over the
        ranks; fix them to keep shapes, hence the compiled step, across batches).
    Returns: a SparseMetadata whose arrays hold dp * num_tokens, dp * num_reqs (dp *
      (num_reqs + 1) for query_start_loc / seq_start_loc) rows and whose counts are [dp].
    """
    shards = list(shards)
    if not shards or not all(isinstance(md, SparseMetadata) for md in shards):
        raise ValueError("shards must be a non-empty sequence of SparseMetadata, one per "
                         "data-parallel rank")
    sizes = {"num_tokens": (num_tokens, [md.num_tokens for md in shards]),
             "num_reqs": (num_reqs, [md.num_reqs for md in shards]),
             "max_blocks": (max_blocks, [np.shape(md.block_table)[1] for md in shards])}
    common = {}
    for name, (given, per_rank) in sizes.items():
        need = max(per_rank)
        if given is not None and given < need:
            rank = int(np.argmax(per_rank))
            raise ValueError(f"{name} ({given}) is smaller than rank {rank}'s {need}")
        # At least one request row and block column: the kernels read a non-empty table.
        common[name] = max(need if given is None else given, 1 if name != "num_tokens" else 0)
    tokens, reqs, width = common["num_tokens"], common["num_reqs"], common["max_blocks"]

    def pack(field):
        parts = []
        for md in shards:
            x = np.asarray(getattr(md, field))
            if field in _TOKEN_PAD:
                x = _pad_rows(x, tokens, _TOKEN_PAD[field])
            elif field in _REQUEST_PAD:
                x = _pad_rows(x, reqs, _REQUEST_PAD[field])
            elif field in _OFFSET_FIELDS:
                x = _pad_rows(x, reqs + 1, x[-1])
            else:  # block_table
                x = _pad_rows(x, reqs, -1)
                x = np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1)
            parts.append(x)
        return np.concatenate(parts)

    arrays = {f: pack(f) for f in ARRAY_FIELDS}
    counts = {f: np.array([int(getattr(md, f)) for md in shards], np.int32)
              for f in COUNT_FIELDS}
    return SparseMetadata(**arrays, **counts)
