"""Which top-k entries each token attends, in PyTorch ops: the one home of the rule for every
eager and planning step (the front end's token maps, the union and k2q plans, the eager path).
No Triton here, so the eager path runs where Triton is not installed; the Triton kernels hold
the same rule in `attention.py`.

Token t of request r at position p is live when p >= 0 and 0 <= r < num_reqs. Its visible
blocks are the first nvis = p // block_size + 1 of its request (at most the block table's
width). Entry b of its top-k row is valid when 0 <= b < nvis, the page block_table[r, b] lies
in [0, num_blocks) and no earlier entry of the row holds b (a repeated block is attended once,
at its first occurrence; contract 5). Every other entry is skipped, wherever it stands.
"""
from __future__ import annotations

import torch


def decode_token_map(seq_lens: torch.Tensor, decode_query_len: int):
    """(token_to_req, token_positions) of a uniform decode batch: query j of request r is
    token r * L + j at position seq_lens[r] - L + j."""
    num_tokens = seq_lens.shape[0] * decode_query_len
    tokens = torch.arange(num_tokens, device=seq_lens.device)
    req = tokens // decode_query_len
    return req, seq_lens.long()[req] - decode_query_len + tokens % decode_query_len


def prefill_token_map(cu_seqlens_q: torch.Tensor, prefix_lens: torch.Tensor, num_tokens: int):
    """(token_to_req, token_positions) of a prefill batch: token t of request r (cu_seqlens_q[r]
    <= t < cu_seqlens_q[r + 1]) sits at prefix_lens[r] + t - cu_seqlens_q[r]; tokens past the
    last request are padding (position -1)."""
    num_reqs = prefix_lens.shape[0]
    tokens = torch.arange(num_tokens, device=prefix_lens.device)
    if num_reqs == 0:
        return torch.zeros_like(tokens), torch.full_like(tokens, -1)
    starts = cu_seqlens_q.long()
    req = torch.searchsorted(starts[1:], tokens, right=True)
    live = req < num_reqs
    req = req.clamp(max=num_reqs - 1)
    positions = prefix_lens.long()[req] + tokens - starts[req]
    return req, torch.where(live, positions, -1)


def first_occurrences(topk: torch.Tensor) -> torch.Tensor:
    """bool [..., topk]: True where an entry differs from every entry before it in its row
    (the last axis). A [..., topk, topk] comparison: rows are short (16 for MiniMax-M3)."""
    width = topk.shape[-1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=topk.device).tril(-1)
    return ~((topk[..., :, None] == topk[..., None, :]) & earlier).any(-1)


def selected_pages(topk: torch.Tensor, block_table: torch.Tensor, token_to_req: torch.Tensor,
                   token_positions: torch.Tensor, num_blocks: int, block_size: int,
                   token_mask: torch.Tensor | None = None):
    """Which top-k entries a token attends, and their pages (in the kernels:
    `triton_common.visible_blocks`, `triton_common.entry_page`, `attention._first_occurrences`).

    topk: [num_kv_heads, n, topk] logical blocks of tokens with token_to_req / token_positions
    [n]; block_table: [num_reqs, max_blocks]; token_mask: optional bool [n] (False: the token
    selects nothing). Returns (valid, block, page), each [num_kv_heads, n, topk]: valid (bool)
    when the token is live (position >= 0, request in range), 0 <= block <= position //
    block_size, block < max_blocks, its page lies in [0, num_blocks) and no earlier entry of
    the row holds the same block (a repeat counts once); block and page are int64, 0 where
    invalid.
    """
    num_reqs, max_blocks = block_table.shape
    req = token_to_req.long()
    pos = token_positions.long()
    live = (pos >= 0) & (req >= 0) & (req < num_reqs)
    if token_mask is not None:
        live &= token_mask
    limit = torch.where(live, torch.clamp(pos // block_size + 1, max=max_blocks), 0)
    block = topk.long()
    valid = (block >= 0) & (block < limit[None, :, None]) & first_occurrences(block)
    block = torch.where(valid, block, 0)
    page = block_table[torch.where(live, req, 0)[None, :, None], block].long()
    valid &= (page >= 0) & (page < num_blocks)
    return valid, block, torch.where(valid, page, 0)
