"""What every implementation shares: which cache page a top-k entry selects, and how a row's
repeated entries count.

Every index is clamped before it is used, so whatever a top-k row holds, no read leaves the
cache or the block-table row; what clamping changed is masked out instead. A block a row lists
twice is attended once (contract, section 5): only its first occurrence in the row is valid.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked scores: exp2(MASK_VALUE - m) == 0 without inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = float(np.log2(np.e))


def first_in_row(rows):
    """[..., k] bool: True where the entry differs from every earlier entry of its row.

    Two equal entries of one row name the same block of the same token, so they are valid or
    invalid together: dropping every repeat leaves the row's valid blocks, each once. An
    O(k^2) compare (k = topk_blocks = 16: 256 compares per row), in integer ops only so the
    Pallas kernels can run it on a row held in registers.
    """
    k = rows.shape[-1]
    cols = jnp.arange(k, dtype=jnp.int32)
    earlier = cols[None, :] < cols[:, None]                      # [k (this), k (earlier)]
    repeat = jnp.where((rows[..., :, None] == rows[..., None, :]) & earlier, 1, 0)
    return repeat.max(axis=-1) == 0


def select_pages(entry, position, lookup, *, block_size: int, max_blocks: int, num_blocks: int):
    """Validity, clamped logical block and physical page of top-k entries (any shape).

    entry: logical block(s) from a top-k row; position: the token's absolute position (-1 for a
    padding token, which selects nothing); lookup(block) -> block_table[request, block] for a
    block already clamped into [0, max_blocks).
    Returns (valid, block, page): valid when 0 <= entry <= position // block_size, entry <
    max_blocks and the page lies in [0, num_blocks); block and page are always in range.
    Repeats are not looked at here: `select_rows` takes whole rows and drops them.
    """
    visible = jnp.minimum(position // block_size + 1, max_blocks)
    valid = (entry >= 0) & (entry < visible)
    block = jnp.clip(entry, 0, max_blocks - 1)
    page = lookup(block)
    valid = valid & (page >= 0) & (page < num_blocks)
    return valid, block, jnp.where(valid, page, 0)


def select_rows(rows, position, lookup, *, block_size: int, max_blocks: int, num_blocks: int):
    """`select_pages` of whole top-k rows [..., topk] (the last axis is the row), with a
    repeated entry valid only at its first occurrence (`first_in_row`): the rule every plan
    (XLA, TPU, Mosaic GPU, union, k2q) applies. position broadcasts against rows."""
    valid, block, page = select_pages(rows, position, lookup, block_size=block_size,
                                      max_blocks=max_blocks, num_blocks=num_blocks)
    valid = valid & first_in_row(rows)
    return valid, block, jnp.where(valid, page, 0)


def key_mask(valid, block, position, block_size: int):
    """[..., block_size] bool: keys of the selected block(s) the token may attend (j <= position).

    valid / block: same shape (a scalar in the kernel); position: the token's, a scalar.
    """
    keys = block[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    return valid[..., None] & (keys <= position)
