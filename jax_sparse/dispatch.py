"""Which Pallas kernel runs which rows of a decode-first batch: the one place that decides.

Under `jax.jit` the number of decode tokens is traced, so which rows are decodes is a traced
fact (`token < num_decode_tokens`); grids come from the static shapes, and each path takes its
rows through a traced token mask (programs of the other rows exit), writing them into the
output the paths before it produced. One compiled call serves every batch of the same padded
sizes, and nothing is read back to the host.

Decode rows always run on the token kernel (`attention.py`, split-K). `prefill_algorithm`
picks the path of the prefill rows (padding rows included; they give zeros on every path):
- "token": the token kernel, one launch with the decode rows (the batch as it always ran).
- "union": token tiles over the union of their blocks (`union.py`).
- "k2q": key-to-query (`k2q.py`).
- "auto": a batch of fewer than UNION_MIN_TOKENS (padded) tokens runs as "token". A larger
  one is planned tile by tile on the device: a tile of prefill rows whose union is at most
  `max_union` runs on the union kernel; the other prefill rows go to k2q when the batch has
  at least K2Q_MIN_TOKENS (padded) tokens, else to the token kernel. On a Hopper GPU with
  Mosaic GPU, `HOPPER_AUTO` (the one table of that choice, `hopper_union`) may give the union
  tiles to the Mosaic GPU union kernel instead, with its own share (MOSAIC_UNION_MAX_SHARE),
  and every other row to the Triton-backend token kernel, compacted (`run_on_rows`): each
  backend runs what it is fastest at.

Under implementation="mosaic" (`sparse_attention_mosaic`, Pallas Mosaic GPU) the same rules
pick among the Mosaic kernels (`mosaic_prefill_path`): decode rows, "token" and "k2q" run on
the Mosaic token kernel (`mosaic.py`); "union" runs every prefill row on the Mosaic union
kernel (`mosaic_union.py`); "auto" runs a batch of at least UNION_MIN_TOKENS (padded) tokens
tile by tile, tiles whose union is at most `max_union(..., MOSAIC_UNION_MAX_SHARE)` on the
union kernel, the other rows on the token kernel (through a token mask). What
`mosaic_union.unsupported_reason` refuses (FP8 with per-slot scales, GQA groups past 64
query heads), and what `HOPPER_AUTO` gives no union kernel, runs every row on the token
kernel.

On Hopper, compiled, a batch of at least UNION_MIN_TOKENS (padded) tokens under "auto":

| implementation | cache | small-union tiles (share) | other prefill rows, decodes |
|---|---|---|---|
| "pallas" (default) | 16-bit | Mosaic union (0.65) | Pallas-Triton token |
| "pallas" (default) | FP8, no / scalar scale | Mosaic union (0.65) | Pallas-Triton token |
| "pallas" (default) | FP8, per-slot scales | Pallas-Triton union (0.25) | Pallas-Triton token |
| "mosaic" | 16-bit, FP8 no / scalar | Mosaic union (0.65) | Mosaic token |
| "mosaic" | FP8, per-slot scales | - | Mosaic token |

Smaller batches, and "token" / "k2q", run as off Hopper; "union" runs every prefill row on
the implementation's union kernel ("mosaic": where `unsupported_reason` allows).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

from interop import SparseAttentionSpec, check_prefill_algorithm, tiling
from interop.tiling import UNION_MIN_TOKENS

from .attention import paged_sparse_attention
from .k2q import paged_sparse_attention_k2q
from .mosaic_union import paged_sparse_attention_mosaic_union, unsupported_reason
from .union import paged_sparse_attention_union, paged_sparse_attention_union_capped, tile_tokens

# Thresholds from the H100 benchmark (64/4 heads, top-16, bf16; benchmarks/results/h100).
# Batches of fewer (padded) tokens than interop.tiling.UNION_MIN_TOKENS stay on the token
# kernel under "auto" (shared with torch_sparse, measured there); the padded size is a static
# fact, so a jitted call never changes its kernels between batches.
# "auto" gives a tile to the union kernel when its largest union over the KV heads is at most
# this share of the tile's tile_tokens * topk selections (32 of 128 at GQA 16). The Pallas
# union kernel runs at about 220 raw TFLOP/s (220 * 16 / union useful), so it beats the token
# kernel's 115 up to a union of about 30.
UNION_MAX_SHARE = 0.25
# Batches of at least this many (padded) tokens send the tiles the union kernel leaves to k2q,
# smaller ones to the token kernel. The Pallas k2q path never beat the token kernel on the
# H100 (64k random: 37.3 ms against 36.7; 16k: 10.8 against 9.0), so "auto" leaves those
# tiles to the token kernel at any size this library is used at; forcing "k2q" still runs it.
K2Q_MIN_TOKENS = 1 << 30
# The Mosaic GPU union kernel's share under "auto" (implementation="mosaic"): the same rule
# with its own measured share. H200, 64/4 bf16, 16k tokens (benchmarks/mosaic_union_bench.py,
# results/h200/mosaic_union_bench.log): the union kernel's raw rate (useful x union / 16) is
# 390-440 TFLOP/s (useful 255 at a mean 8-token union of 24.6 with rho0.87, 138 at 51.2 with
# random selections), the Mosaic token kernel's useful rate 81-84, so the union kernel wins
# up to a union of about 86 (440 * 16 / 82): 0.65 of a tile's tile_tokens * topk selections
# (83 of 128 at GQA 16). Measured with 0.5 (64): auto 254 / 251 TFLOP/s at 16k / 64k rho0.87
# (the union kernel alone: 255 / 243), 100 at 16k random, where the union kernel alone ran
# at 138 (the tiles above 64 went to the token kernel); with the Triton backend's 0.25: 157
# / 123 at 16k / 64k rho0.87.
MOSAIC_UNION_MAX_SHARE = 0.65

# The one table of the Hopper choice under "auto" (the module's table): (implementation,
# `cache_class`) -> the kernel that takes the small-union tiles ("mosaic": the Mosaic GPU
# union kernel, "pallas": the Triton-backend union kernel, None: none, every prefill row on
# the token kernel). The other rows run on the implementation's token kernel.
# FP8 rows: the Mosaic union kernel dequantizes each page once per stage (FP8 ring ->
# 16-bit ring, in its producer warpgroup); on the H200 the Triton-backend union ran FP8 at
# 122 useful TFLOP/s (64/4, 64k rho0.87, PERF.md) against 139 for bf16, and the Mosaic
# union kernel runs bf16 at 243-251, so FP8 goes to it. Not yet timed on FP8
# (benchmarks/mosaic_union_bench.py --cache fp8_e4m3): if it loses to 122 there, set
# ("pallas", "fp8") to "pallas".
HOPPER_AUTO: dict[tuple[str, str], str | None] = {
    ("pallas", "16-bit"): "mosaic",
    ("pallas", "fp8"): "mosaic",
    ("pallas", "fp8-per-slot"): "pallas",
    ("mosaic", "16-bit"): "mosaic",
    ("mosaic", "fp8"): "mosaic",
    ("mosaic", "fp8-per-slot"): None,
}


def cache_class(cache_dtype, k_scale=None) -> str:
    """`HOPPER_AUTO`'s cache key: "16-bit", "fp8" (no or a scalar scale) or "fp8-per-slot"
    (k_scale [num_kv_heads, slots]: a scale per key, which no kernel can fold)."""
    if jnp.dtype(cache_dtype).itemsize == 2:
        return "16-bit"
    return "fp8-per-slot" if k_scale is not None and jnp.ndim(k_scale) == 2 else "fp8"


def _mosaic_union_reason(spec: SparseAttentionSpec, cache_dtype, k_scale) -> str | None:
    return unsupported_reason(spec, cache_dtype,
                              per_slot_scales=cache_class(cache_dtype, k_scale) == "fp8-per-slot")


def max_union(num_queries_per_kv: int, topk: int, share: float = UNION_MAX_SHARE) -> int:
    """The largest tile union (blocks per KV head) that "auto" gives to the union kernel."""
    return tiling.max_union(num_queries_per_kv, topk, share)


def sparse_attention_pallas(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                            token_to_req, token_positions, block_table, k_scale=None,
                            v_scale=None, *, num_decode_tokens, prefill_algorithm: str = "auto",
                            num_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int = 2, interpret: bool | None = None,
                            force_packed: bool = False):
    """Attention of a decode-first batch on the Pallas kernels; inputs already validated (as
    `attention.paged_sparse_attention` takes them).

    Args:
      num_decode_tokens: int32 scalar (traced): rows [0, num_decode_tokens) are decodes.
      prefill_algorithm: "auto", "token", "union" or "k2q" (static; see the module); any
        other value is a ValueError at trace time.
      num_splits / num_warps / num_stages: the token kernel's knobs.
      interpret / force_packed: as in `attention.paged_sparse_attention`, for every path.
    Returns: [num_tokens, num_heads, head_size] in the query dtype.
    """
    check_prefill_algorithm(prefill_algorithm)
    num_tokens = query.shape[0]
    args = (spec, query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
            k_scale, v_scale)
    common = dict(interpret=interpret, force_packed=force_packed)
    token_kernel = functools.partial(paged_sparse_attention, *args, num_splits=num_splits,
                                     num_warps=num_warps, num_stages=num_stages, **common)
    if prefill_algorithm == "token" or (prefill_algorithm == "auto"
                                        and num_tokens < UNION_MIN_TOKENS):
        return token_kernel()
    decode = jnp.arange(num_tokens, dtype=jnp.int32) < num_decode_tokens
    if prefill_algorithm == "union":
        out = paged_sparse_attention_union(*args, token_mask=~decode, **common)
    elif prefill_algorithm == "k2q":
        out = paged_sparse_attention_k2q(*args, token_mask=~decode, **common)
    elif hopper_union(spec, kv_cache.dtype, interpret, k_scale):
        # The Mosaic GPU union kernel takes the small-union tiles (1.8x the Triton-backend
        # union on the H200), the Triton-backend token kernel every other row (1.4x the Mosaic
        # token kernel), compacted so that no launch covers rows it does not compute.
        out, left = paged_sparse_attention_mosaic_union(
            *args, token_mask=~decode,
            max_union=max_union(spec.num_queries_per_kv, spec.topk_blocks,
                                MOSAIC_UNION_MAX_SHARE))

        def token_rows(index):  # the token kernel on rows `index` (num_tokens: none)
            row = jnp.minimum(index, num_tokens - 1)
            return paged_sparse_attention(
                spec, query[row], kv_cache, topk_indices[:, row], token_to_req[row],
                jnp.where(index < num_tokens, token_positions[row], -1), block_table,
                k_scale, v_scale, num_splits=num_splits, num_warps=num_warps,
                num_stages=num_stages, **common)

        return run_on_rows(token_rows, decode | left, out)
    else:
        out, left = paged_sparse_attention_union_capped(
            *args, max_union=max_union(spec.num_queries_per_kv, spec.topk_blocks),
            token_mask=~decode, **common)
        if num_tokens >= K2Q_MIN_TOKENS:
            out = paged_sparse_attention_k2q(*args, token_mask=left, out=out, **common)
        else:
            decode = decode | left  # the token kernel takes them with the decodes
    return token_kernel(token_mask=decode, out=out)


def hopper_union(spec: SparseAttentionSpec, cache_dtype, interpret, k_scale=None) -> bool:
    """Whether "auto" on the Pallas kernels gives its small-union tiles to the Mosaic GPU union
    kernel: compiled (not interpreted) on a Hopper GPU where Mosaic GPU runs, where
    `HOPPER_AUTO` says so and the kernel takes the layer (`mosaic_union.unsupported_reason`).
    k_scale: the call's (its shape says whether the scales are per slot). A static fact."""
    if (interpret or HOPPER_AUTO["pallas", cache_class(cache_dtype, k_scale)] != "mosaic"
            or _mosaic_union_reason(spec, cache_dtype, k_scale) is not None):
        return False
    from .mosaic import mosaic_available
    return mosaic_available()


def mosaic_prefill_path(spec: SparseAttentionSpec, num_tokens: int, cache_dtype,
                        prefill_algorithm: str, k_scale=None) -> str:
    """Which Mosaic GPU kernels run the prefill rows of a batch of `num_tokens` (padded)
    tokens (static facts only): "token" (the token kernel, with the decode rows), "union"
    (every prefill row on the union kernel) or "capped" (tiles whose union is at most
    `max_union(..., MOSAIC_UNION_MAX_SHARE)` on the union kernel, other rows on the token
    kernel). k_scale: the call's. See the module docstring and `HOPPER_AUTO`."""
    check_prefill_algorithm(prefill_algorithm)
    if (prefill_algorithm in ("token", "k2q")
            or HOPPER_AUTO["mosaic", cache_class(cache_dtype, k_scale)] != "mosaic"
            or _mosaic_union_reason(spec, cache_dtype, k_scale)):
        return "token"
    if prefill_algorithm == "union":
        return "union"
    return "capped" if num_tokens >= UNION_MIN_TOKENS else "token"


def sparse_attention_mosaic(spec: SparseAttentionSpec, query, kv_cache, topk_indices,
                            token_to_req, token_positions, block_table, k_scale=None,
                            v_scale=None, *, num_decode_tokens, prefill_algorithm: str = "auto",
                            num_splits: int | None = None, pages_in_flight: int | None = None):
    """Attention of a decode-first batch on the Mosaic GPU kernels (`implementation="mosaic"`);
    inputs already validated (as `attention.paged_sparse_attention` takes them).

    num_decode_tokens: int32 scalar (traced); prefill_algorithm: see `mosaic_prefill_path`;
    num_splits / pages_in_flight: the token kernel's knobs (`mosaic.MosaicConfig`).
    Raises RuntimeError (at trace time) where Mosaic GPU cannot run
    (`mosaic.mosaic_unavailable_reason`).
    """
    from .mosaic import mosaic_unavailable_reason
    from .mosaic import sparse_attention_mosaic as token_path

    path = mosaic_prefill_path(spec, query.shape[0], kv_cache.dtype, prefill_algorithm,
                               k_scale)
    if path == "token":
        return token_path(spec, query, kv_cache, topk_indices, token_to_req, token_positions,
                          block_table, k_scale, v_scale, num_decode_tokens=num_decode_tokens,
                          prefill_algorithm=prefill_algorithm, num_splits=num_splits,
                          pages_in_flight=pages_in_flight)
    reason = mosaic_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f'implementation="mosaic" cannot run here: {reason}. Use '
                           'implementation=None (the platform default) or "pallas"/"xla".')
    num_tokens = query.shape[0]
    decode = jnp.arange(num_tokens, dtype=jnp.int32) < num_decode_tokens
    cap = (max_union(spec.num_queries_per_kv, spec.topk_blocks, MOSAIC_UNION_MAX_SHARE)
           if path == "capped" else None)
    out, left = paged_sparse_attention_mosaic_union(
        spec, query, kv_cache, topk_indices, token_to_req, token_positions, block_table,
        k_scale, v_scale, token_mask=~decode, max_union=cap)
    rest = decode | left  # the token kernel's rows

    def token_rows(index):  # the token kernel on rows `index` (num_tokens: none)
        valid = index < num_tokens
        row = jnp.minimum(index, num_tokens - 1)
        return token_path(spec, query[row], kv_cache, topk_indices[:, row], token_to_req[row],
                          jnp.where(valid, token_positions[row], -1), block_table, k_scale,
                          v_scale, num_decode_tokens=num_decode_tokens,
                          prefill_algorithm=prefill_algorithm, num_splits=num_splits,
                          pages_in_flight=pages_in_flight)

    return run_on_rows(token_rows, rest, out)


# Row counts the token kernel's launch is compiled for when it takes the rows the union
# kernel leaves (shares of the batch; the smallest bucket that holds them runs).
ROW_BUCKETS = (1 / 64, 1 / 8, 1.0)


def run_on_rows(kernel, rows, out, buckets=ROW_BUCKETS):
    """out with its rows `rows` (bool [n], traced) replaced by kernel(index)'s.

    kernel(index) takes int32 [b] row indices (n for none: its rows there are dropped) and
    returns [b, ...] rows. It runs on the smallest of the bucket sizes (shares of n, at least
    1) that holds every row of `rows`, or not at all when there is none: a prefill whose
    tiles all ran on the union kernel launches nothing more, and a few decode rows beside a
    long prefill do not launch a kernel over every token. One XLA conditional.
    """
    n = rows.shape[0]
    sizes = sorted({max(1, min(n, math.ceil(n * b))) for b in buckets} | {n})
    count = rows.sum(dtype=jnp.int32)

    def bucket(size):
        def run():
            index = jnp.nonzero(rows, size=size, fill_value=n)[0].astype(jnp.int32)
            return out.at[index].set(kernel(index).astype(out.dtype), mode="drop")
        return run

    branch = jnp.where(count == 0, 0,
                       1 + sum((count > s).astype(jnp.int32) for s in sizes[:-1]))
    return lax.switch(branch, [lambda: out, *map(bucket, sizes)])
