"""The eager path (impl="eager"): the same operations as the Triton kernels in plain PyTorch
ops, for machines without Triton (and without its interpreter).

Same inputs, same masking rules (`selection.selected_pages`: an entry counts when it is a block
the token may see, inside the block-table row, on a page inside the cache, and not a repeat of
an earlier entry of its row), the same garbage-in rules (contract 5: a non-finite query row
that attends a key gives NaN; a key no row attends never shows; write_kv never writes a slot
outside the cache), computed in float32 with gathers. It is meant for correctness, not speed.
"""
from __future__ import annotations

import torch

from .selection import selected_pages

# Tokens per gather: bounds the [tokens, topk * block_size, head_size] working set.
TOKEN_CHUNK = 64


def _slot_scale(scale: torch.Tensor | None, kv_head: int, slots: torch.Tensor) -> torch.Tensor:
    if scale is None:
        return torch.ones((), device=slots.device)
    if scale.dim() == 2:
        return scale[kv_head][slots].float()
    return scale.reshape(()).float()


def sparse_attention_eager(query: torch.Tensor, kv_cache: torch.Tensor, topk: torch.Tensor,
                           block_table: torch.Tensor, token_to_req: torch.Tensor,
                           token_positions: torch.Tensor, output: torch.Tensor,
                           sm_scale: float, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> None:
    """Writes `output` in place; arguments as in `attention.launch_sparse_attention`."""
    num_tokens, num_heads, head_size = query.shape
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    pos = token_positions[:num_tokens].long()
    valid, blocks, pages = selected_pages(topk[:, :num_tokens], block_table,
                                          token_to_req[:num_tokens], pos, num_blocks,
                                          block_size)
    offs = torch.arange(block_size, device=query.device)

    for t0 in range(0, num_tokens, TOKEN_CHUNK):
        t1 = min(t0 + TOKEN_CHUNK, num_tokens)
        for g in range(num_kv_heads):
            pg = pages[g, t0:t1]                                            # [C, K]
            keys_at = blocks[g, t0:t1, :, None] * block_size + offs          # [C, K, bs]
            mask = valid[g, t0:t1, :, None] & (keys_at <= pos[t0:t1, None, None])
            slots = pg[..., None] * block_size + offs
            k = kv_cache[pg, 0, :, g].float() * _slot_scale(k_scale, g, slots)[..., None]
            v = kv_cache[pg, 1, :, g].float() * _slot_scale(v_scale, g, slots)[..., None]
            c = t1 - t0
            qg = query[t0:t1, g * group:(g + 1) * group].float()           # [C, group, D]
            scores = sm_scale * (qg @ k.reshape(c, -1, head_size).transpose(1, 2))
            mask = mask.reshape(c, 1, -1)
            # A key the token does not attend never shows, whatever its bits: V zeroed (0 * NaN
            # is NaN), score -inf.
            v = torch.where(mask.reshape(c, -1, 1), v.reshape(c, -1, head_size), 0.0)
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            attended = mask.any(-1, keepdim=True)                          # [C, 1, 1]
            # A token with no valid key gets NaN from softmax over -inf: make it zeros. A
            # non-finite query row that attends a key gives NaN (contract 5).
            bad_q = ~qg.isfinite().all(-1, keepdim=True)                   # [C, group, 1]
            weights = torch.where(attended, weights, 0.0)
            out = torch.where(bad_q & attended, float("nan"), weights @ v)
            output[t0:t1, g * group:(g + 1) * group] = out.to(output.dtype)


def write_kv_eager(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor, *, fp8_max: float = 0.0,
                   k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """In-place cache update; arguments as in `cache.launch_write_kv`."""
    num_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    slots = slot_mapping[:key.shape[0]].long()
    live = (slots >= 0) & (slots < num_blocks * block_size)
    slots = slots[live]
    heads = torch.arange(num_kv_heads, device=key.device)
    for kv, new, scale in ((0, key[live], k_scale), (1, value[live], v_scale)):
        if fp8_max > 0:
            new = new.float()
            if scale is not None:
                new = new / (scale[:, slots].T[..., None] if scale.dim() == 2
                             else scale.reshape(()))
            new = new.clamp(-fp8_max, fp8_max)
        kv_cache[(slots // block_size)[:, None], kv, (slots % block_size)[:, None],
                 heads[None, :]] = new.to(kv_cache.dtype)
