"""What both implementations (Pallas and XLA) share: which cache page a top-k entry selects.

Every index is clamped before it is used, so whatever a top-k row holds, no read leaves the
cache or the block-table row; what clamping changed is masked out instead.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked scores: exp2(MASK_VALUE - m) == 0 without inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = float(np.log2(np.e))


def select_pages(entry, position, lookup, *, block_size: int, max_blocks: int, num_blocks: int):
    """Validity, clamped logical block and physical page of top-k entries (any shape).

    entry: logical block(s) from a top-k row; position: the token's absolute position (-1 for a
    padding token, which selects nothing); lookup(block) -> block_table[request, block] for a
    block already clamped into [0, max_blocks).
    Returns (valid, block, page): valid when 0 <= entry <= position // block_size, entry <
    max_blocks and the page lies in [0, num_blocks); block and page are always in range.
    """
    visible = jnp.minimum(position // block_size + 1, max_blocks)
    valid = (entry >= 0) & (entry < visible)
    block = jnp.clip(entry, 0, max_blocks - 1)
    page = lookup(block)
    valid = valid & (page >= 0) & (page < num_blocks)
    return valid, block, jnp.where(valid, page, 0)


def key_mask(valid, block, position, block_size: int):
    """[..., block_size] bool: keys of the selected block(s) the token may attend (j <= position).

    valid / block: same shape (a scalar in the kernel); position: the token's, a scalar.
    """
    keys = block[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return valid[..., None] & (keys <= position)
