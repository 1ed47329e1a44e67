"""Which kernel runs which rows of a decode-first batch: the one place that decides.

Decode rows (the first `first_prefill_token` rows) always run on the token kernel
(`attention.py`, split-K). `prefill_algorithm` picks the path of the prefill rows:
- "token": the token kernel, one launch with the decode rows (the batch as it always ran).
- "union": token tiles over the union of their blocks (`union.py`).
- "k2q": key-to-query (`k2q.py`).
- "auto": `PREFILL_RULE` (an `interop.tiling.PrefillThresholds`). A prefill of fewer than
  its union_min_tokens tokens runs as "token". A larger one is planned tile by tile on the
  device (no host sync): a tile whose union is small enough (the cache dtype's share) runs on
  the union kernel; the others go to the token kernel (or to k2q from k2q_min_tokens tokens),
  which take them through a token mask.
Every choice depends on shapes and on device tensors only, so a CUDA graph can hold the call.
Each family's knobs come as its config (`TokenKernelConfig`, `UnionConfig`, `K2QConfig`); a
config for a family the chosen algorithm never runs is a ValueError, not dropped.
"""
from __future__ import annotations

import torch

from interop import check_prefill_algorithm
from interop.tiling import UNION_MIN_TOKENS, PrefillThresholds

from .attention import TokenKernelConfig, launch_sparse_attention
from .k2q import K2QConfig, launch_k2q
from .union import UnionConfig, launch_union, plan_union, tile_tokens, tokens_per_chunk

# "auto"'s rule; benchmarks/auto_rule.py times it against candidate rules on the H200 rows.
# - Union share 0.375 (48 of 128 at GQA 16): the union kernel delivers about raw * 16 / union
#   useful TFLOP/s (raw 350-400 on the H200), so it beats the token kernel's 125-140 up to a
#   union of about 45 (H100, 16k random, union 51: 8.7 ms against 8.3).
# - The tiles it leaves go to the token kernel: k2q on a token mask costs about as much as k2q
#   on the whole prefill (its plan sorts every entry), so at 64k rho0.87 union tiles plus a k2q
#   rest lost 25% to forced union (H200, 64/4: 141 against 189 useful TFLOP/s), and at 64k
#   random it reached 136 (forced k2q 144, token 134): a token-kernel rest loses at most
#   that row's gap to k2q.
# - FP8 caches take the union kernel as bf16 does: since the union kernel stopped scrubbing V
#   it runs FP8 at 1.33-1.36x the token kernel at 64k rho0.87 (H200: 159 against 117 at 64/4,
#   155 against 116 at 16/1).
PREFILL_RULE = PrefillThresholds(union_min_tokens=UNION_MIN_TOKENS, union_share=0.375,
                                 fp8_union_share=0.375, k2q_min_tokens=None)


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
    fp8 = kv_cache.element_size() == 1
    limit = PREFILL_RULE.max_union(query.shape[1] // kv_cache.shape[3], topk.shape[-1], fp8)
    if (prefill_algorithm == "token" or prefill_tokens == 0
            or (prefill_algorithm == "auto" and (prefill_tokens < PREFILL_RULE.union_min_tokens
                                                 or limit is None))):
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
        rest = _union_small_tiles(*args, **scales, first_token=split, max_union=limit,
                                  config=union_config)
        if PREFILL_RULE.leftover_to_k2q(prefill_tokens):
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
                       output, sm_scale, *, k_scale, v_scale, first_token, max_union,
                       config) -> torch.Tensor:
    """Run the union kernel on the tiles of tokens [first_token, num_tokens) whose union is at
    most `max_union`; returns the bool [num_tokens] mask of the rows it left (True)."""
    num_tokens, num_heads, _ = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    width = topk.shape[-1]
    tokens = tile_tokens(num_heads // num_kv_heads)
    rest = torch.zeros(num_tokens, dtype=torch.bool, device=query.device)
    chunk = tokens_per_chunk(num_kv_heads, width, tokens)
    for start in range(first_token, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        plan = plan_union(topk, block_table, token_to_req, token_positions, num_blocks,
                          tile_tokens=tokens, block_size=block_size, first_token=start,
                          end_token=end)
        launch_union(query, kv_cache, topk, block_table, token_to_req, token_positions, output,
                     sm_scale, k_scale=k_scale, v_scale=v_scale, first_token=start, plan=plan,
                     max_union=max_union, config=config)
        large = plan.tile_size > max_union
        rest[start:end] = large[:, None].expand(-1, tokens).reshape(-1)[:end - start]
    return rest
