"""Which kernel runs which rows of a decode-first batch: the one place that decides.

Decode rows (the first `first_prefill_token` rows) always run on the token kernel
(`attention.py`, split-K). `prefill_algorithm` picks the path of the prefill rows:
- "token": the token kernel, one launch with the decode rows (the batch as it always ran).
- "union": token tiles over the union of their blocks (`union.py`).
- "k2q": key-to-query (`k2q.py`).
- "auto": a prefill of fewer than UNION_MIN_TOKENS tokens, or over an FP8 cache, runs as
  "token". A larger one is
  planned tile by tile on the device (no host sync): a tile whose union is small enough runs
  on the union kernel; the others go to k2q when the prefill has at least K2Q_MIN_TOKENS
  tokens, else to the token kernel (both take them through a token mask).
Every choice depends on shapes and on device tensors only, so a CUDA graph can hold the call.
Each family's knobs come as its config (`TokenKernelConfig`, `UnionConfig`, `K2QConfig`); a
config for a family the chosen algorithm never runs is a ValueError, not dropped.
"""
from __future__ import annotations

import torch

from interop import check_prefill_algorithm, tiling
from interop.tiling import UNION_MIN_TOKENS

from .attention import TokenKernelConfig, launch_sparse_attention
from .k2q import K2QConfig, launch_k2q
from .union import UnionConfig, launch_union, plan_union, tile_tokens, tokens_per_chunk

# Thresholds from the H100 benchmark (64/4 heads, top-16, bf16; benchmarks/results/h100);
# UNION_MIN_TOKENS (prefills below it stay on the token kernel) is shared with jax_sparse
# and lives in interop.tiling with its measurements.
# "auto" gives a tile to the union kernel when its largest union over the KV heads is at most
# this share of the tile's tile_tokens * topk selections (48 of 128 at GQA 16). The union
# kernel runs at about 350 raw TFLOP/s, so it delivers 350 * 16 / union useful TFLOP/s: it
# beats the token kernel's 120 up to a union of about 46 (16k tokens, random selection,
# union 51: 8.7 ms against 8.3).
UNION_MAX_SHARE = 0.375
# FP8 caches stay on the token kernel under "auto": the union kernel runs FP8 at about 190 raw
# TFLOP/s (bf16: 350), and with the plans' cost "auto" lost to the token kernel on some H100
# rows whatever the union limit (16/1 heads, 64k tokens: 0.90x at a limit of 48, 0.93x at 25).
# Prefills of at least this many tokens send the tiles the union kernel leaves to k2q, smaller
# ones to the token kernel: k2q's per-chunk plan (a sort of every entry of the chunk) pays off
# only on long prefills (64k random: 32.2 ms against 35.0; 16k correlated: 11.1 against 8.2).
K2Q_MIN_TOKENS = 32768


def max_union(group: int, topk: int) -> int:
    """The largest tile union (blocks per KV head) that "auto" gives to the union kernel."""
    return tiling.max_union(group, topk, UNION_MAX_SHARE)


def sparse_attention(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                     block_table: torch.Tensor, token_to_req: torch.Tensor,
                     token_positions: torch.Tensor, output: torch.Tensor, sm_scale: float, *,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     first_prefill_token: int = 0, prefill_algorithm: str = "auto",
                     token_config: TokenKernelConfig | None = None,
                     union_config: UnionConfig | None = None,
                     k2q_config: K2QConfig | None = None) -> None:
    """Attention of a decode-first batch; writes every row of `output` in place.

    query / output: [num_tokens, num_heads, head_size]; kv_cache: the logical view
    (num_blocks, 2, block_size, num_kv_heads, head_size); topk: [num_kv_heads, >= num_tokens,
    topk]; block_table: [num_reqs, max_blocks]; token_to_req / token_positions: [num_tokens];
    k_scale / v_scale: None, a 0-d or [num_kv_heads, num_blocks * block_size] float32 tensor
    (FP8 caches only); rows [0, first_prefill_token) are decodes, the rest prefill tokens
    (padding included). token_config / union_config / k2q_config: the families' knobs (None:
    each one's get_default()). Inputs are validated by the caller; an unknown
    prefill_algorithm, or a config of a family it never runs ("token" runs the token kernel
    alone, "union" and "k2q" add their own family), is a ValueError before any launch.
    """
    check_prefill_algorithm(prefill_algorithm)
    check_configs(prefill_algorithm, union_config, k2q_config)
    num_tokens = query.shape[0]
    split = first_prefill_token
    prefill_tokens = num_tokens - split
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    token = dict(scales, config=token_config)
    if (prefill_algorithm == "token" or prefill_tokens == 0
            or (prefill_algorithm == "auto" and (prefill_tokens < UNION_MIN_TOKENS
                                                 or kv_cache.element_size() == 1))):
        launch_sparse_attention(query, kv_cache, topk, block_table, output, sm_scale,
                                token_to_req=token_to_req, token_positions=token_positions,
                                **token)
        return
    if split:
        launch_sparse_attention(query[:split], kv_cache, topk[:, :split], block_table,
                                output[:split], sm_scale, token_to_req=token_to_req[:split],
                                token_positions=token_positions[:split], **token)
    args = (query, kv_cache, topk, block_table, token_to_req, token_positions, output, sm_scale)
    if prefill_algorithm == "union":
        launch_union(*args, **scales, first_token=split, config=union_config)
    elif prefill_algorithm == "k2q":
        launch_k2q(*args, **scales, first_token=split, config=k2q_config)
    else:
        rest = _union_small_tiles(*args, **scales, first_token=split, config=union_config)
        if prefill_tokens >= K2Q_MIN_TOKENS:
            launch_k2q(*args, **scales, first_token=split, token_mask=rest, config=k2q_config)
        else:
            launch_sparse_attention(query[split:], kv_cache, topk[:, split:], block_table,
                                    output[split:], sm_scale, token_to_req=token_to_req[split:],
                                    token_positions=token_positions[split:],
                                    token_mask=rest[split:], **token)


def check_configs(prefill_algorithm: str, union_config: UnionConfig | None,
                  k2q_config: K2QConfig | None) -> None:
    """A ValueError for a family's config that `prefill_algorithm` never uses."""
    unused = [name for name, config, users in (("union_config", union_config, ("union", "auto")),
                                               ("k2q_config", k2q_config, ("k2q", "auto")))
              if config is not None and prefill_algorithm not in users]
    if unused:
        raise ValueError(f"{' and '.join(unused)} given, but prefill_algorithm "
                         f"{prefill_algorithm!r} never runs that family")


def _union_small_tiles(query, kv_cache, topk, block_table, token_to_req, token_positions,
                       output, sm_scale, *, k_scale, v_scale, first_token,
                       config) -> torch.Tensor:
    """Run the union kernel on the tiles of tokens [first_token, num_tokens) whose union is at
    most `max_union`; returns the bool [num_tokens] mask of the rows it left (True)."""
    num_tokens, num_heads, _ = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    width = topk.shape[-1]
    tokens = tile_tokens(num_heads // num_kv_heads)
    limit = max_union(num_heads // num_kv_heads, width)
    rest = torch.zeros(num_tokens, dtype=torch.bool, device=query.device)
    chunk = tokens_per_chunk(num_kv_heads, width, tokens)
    for start in range(first_token, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        plan = plan_union(topk, block_table, token_to_req, token_positions, num_blocks,
                          tile_tokens=tokens, block_size=block_size, first_token=start,
                          end_token=end)
        launch_union(query, kv_cache, topk, block_table, token_to_req, token_positions, output,
                     sm_scale, k_scale=k_scale, v_scale=v_scale, first_token=start, plan=plan,
                     max_union=limit, config=config)
        large = plan.tile_size > limit
        rest[start:end] = large[:, None].expand(-1, tokens).reshape(-1)[:end - start]
    return rest
