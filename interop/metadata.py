"""The common metadata schema and its builder (NumPy flavour).

`SparseMetadata` stores whole-batch arrays (decode-first) and derives the per-phase views
`prefill` / `decode` from them, so every fact has one home. The same dataclass holds NumPy
arrays (from `build_metadata`), PyTorch tensors or JAX arrays (from `interop.to_torch` /
`interop.to_jax`); in the JAX flavour it is a pytree whose arrays and counts are leaves, so a
jitted function sees a new batch of the same padded sizes without recompiling.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .spec import SUPPORTED_BLOCK_SIZES

Array = Any  # numpy.ndarray, torch.Tensor or jax.Array, by flavour


@dataclasses.dataclass
class PrefillMetadata:
    """The prefill requests of a batch (they follow the decodes).

    cu_seqlens_q: [num_prefills + 1] int32, query offsets rebased to 0.
    cu_seqlens_k: [num_prefills + 1] int32, cumulative KV lengths (context + query).
    seq_lens / context_lens: [num_prefills] int32.
    block_table: [num_prefills, max_blocks] int32.
    """

    cu_seqlens_q: Array
    cu_seqlens_k: Array
    seq_lens: Array
    context_lens: Array
    block_table: Array
    max_query_len: int
    max_seq_len: int
    total_kv_blocks: int


@dataclasses.dataclass
class DecodeMetadata:
    """The decode requests of a batch (they come first), each with `decode_query_len` tokens.

    seq_lens: [num_decodes] int32; block_table: [num_decodes, max_blocks] int32.
    """

    seq_lens: Array
    block_table: Array
    decode_query_len: int


# Fields that hold arrays (leaves of every flavour) and the host counts.
ARRAY_FIELDS = ("seq_lens", "slot_mapping", "query_start_loc", "seq_start_loc", "context_lens",
                "block_table", "token_to_req", "token_positions")
COUNT_FIELDS = ("max_seq_len", "num_actual_tokens", "num_decodes", "num_decode_tokens",
                "num_prefills", "num_prefill_tokens", "decode_query_len",
                "max_prefill_query_len", "max_prefill_seq_len", "prefill_kv_blocks")


@dataclasses.dataclass
class SparseMetadata:
    """Per-step metadata of a decode-first batch, shared by every layer.

    Contract fields:
      seq_lens: [num_reqs] int32 (context + query tokens of each request).
      max_seq_len, num_actual_tokens, num_decodes, num_decode_tokens, num_prefills,
      num_prefill_tokens: counts.
      slot_mapping: [num_tokens] int64 cache slot of each token (-1: padding, not written).
      prefill / decode: per-phase views (properties), None when the phase is empty.
    Derived whole-batch fields (what the kernels read):
      query_start_loc: [num_reqs + 1] int32 query offsets.
      seq_start_loc: [num_reqs + 1] int32 cumulative sequence lengths.
      context_lens: [num_reqs] int32 tokens already cached before this step.
      block_table: [num_reqs, max_blocks] int32 logical block -> physical page.
      token_to_req: [num_tokens] int32 request of each token (0 for padding tokens).
      token_positions: [num_tokens] int32 absolute position of each token (-1: padding).
      decode_query_len: query tokens of every decode request.
      max_prefill_query_len, max_prefill_seq_len, prefill_kv_blocks: prefill-only counts.
    """

    seq_lens: Array
    max_seq_len: int
    slot_mapping: Array
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    query_start_loc: Array
    seq_start_loc: Array
    context_lens: Array
    block_table: Array
    token_to_req: Array
    token_positions: Array
    decode_query_len: int
    max_prefill_query_len: int
    max_prefill_seq_len: int
    prefill_kv_blocks: int

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Token rows, padding included (>= num_actual_tokens)."""
        return int(self.slot_mapping.shape[0])

    @property
    def decode(self) -> DecodeMetadata | None:
        if int(self.num_decodes) == 0:
            return None
        nd = int(self.num_decodes)
        return DecodeMetadata(seq_lens=self.seq_lens[:nd], block_table=self.block_table[:nd],
                              decode_query_len=self.decode_query_len)

    @property
    def prefill(self) -> PrefillMetadata | None:
        if int(self.num_prefills) == 0:
            return None
        nd = int(self.num_decodes)
        return PrefillMetadata(
            cu_seqlens_q=self.query_start_loc[nd:] - self.query_start_loc[nd],
            cu_seqlens_k=self.seq_start_loc[nd:] - self.seq_start_loc[nd],
            seq_lens=self.seq_lens[nd:],
            context_lens=self.context_lens[nd:],
            block_table=self.block_table[nd:],
            max_query_len=self.max_prefill_query_len,
            max_seq_len=self.max_prefill_seq_len,
            total_kv_blocks=self.prefill_kv_blocks,
        )

    def replace(self, **changes) -> "SparseMetadata":
        return dataclasses.replace(self, **changes)


def _int_vector(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        i = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{name}[{i}] = {arr[i]} is negative; lengths must be >= 0")
    return arr


def _check_pages(bt: np.ndarray, seq_lens: np.ndarray, block_size: int,
                 num_blocks: int | None) -> np.ndarray:
    """Check that each request's block-table row is wide enough for its sequence and that the
    pages it uses are in [0, num_blocks) (non-negative when num_blocks is None); returns the
    blocks each request needs."""
    num_reqs, max_blocks = bt.shape
    blocks_needed = -(-seq_lens // block_size)
    if num_reqs and blocks_needed.max(initial=0) > max_blocks:
        i = int(np.argmax(blocks_needed))
        raise ValueError(f"request {i}: seq_lens[{i}] = {seq_lens[i]} needs {blocks_needed[i]} "
                         f"blocks of {block_size} but block_table rows hold {max_blocks}")
    used = np.arange(max_blocks)[None, :] < blocks_needed[:, None]
    high = np.iinfo(np.int64).max if num_blocks is None else num_blocks
    bad = used & ((bt < 0) | (bt >= high))
    if bad.any():
        r, b = (int(x) for x in np.argwhere(bad)[0])
        where = "negative" if num_blocks is None else f"outside [0, {num_blocks}) (num_blocks)"
        raise ValueError(f"block_table[{r}, {b}] = {bt[r, b]} is {where} for a block request "
                         f"{r} uses")
    return blocks_needed


def _host(x) -> np.ndarray:
    """A NumPy copy of any flavour's array (PyTorch tensors through .cpu())."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


def validate_metadata(metadata: SparseMetadata, num_blocks: int, *,
                      block_size: int = 128) -> SparseMetadata:
    """Host-side check of a SparseMetadata (any flavour) against a cache of `num_blocks` pages.

    Checks what the kernels trust without checking (they stay memory-safe, but the answer
    would be wrong): each block-table row is wide enough for its sequence (a table narrowed
    after `build_metadata` reads past its rows), every page a request uses lies in
    [0, num_blocks), every non-negative slot lies in the cache, and the token arrays agree in
    length. Raises ValueError naming the first bad entry; returns the metadata unchanged.
    Copies the arrays to the host: call it when a batch is built, not per layer.
    """
    if not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    seq_lens = _host(metadata.seq_lens).astype(np.int64)
    bt = _host(metadata.block_table)
    if bt.ndim != 2 or bt.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"block_table shape {bt.shape} does not match: expected "
                         f"[{seq_lens.shape[0]} requests, max_blocks]")
    _check_pages(bt.astype(np.int64), seq_lens, block_size, int(num_blocks))
    slots = _host(metadata.slot_mapping).astype(np.int64)
    for name in ("token_to_req", "token_positions"):
        n = _host(getattr(metadata, name)).shape[0]
        if n != slots.shape[0]:
            raise ValueError(f"{name} has {n} tokens but slot_mapping has {slots.shape[0]}")
    bad = np.flatnonzero(slots >= int(num_blocks) * block_size)
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"slot_mapping[{t}] = {slots[t]} is past the cache "
                         f"({num_blocks} blocks x {block_size} = {num_blocks * block_size} slots)")
    counts = {f: int(_host(getattr(metadata, f))) for f in
              ("num_decodes", "num_prefills", "num_actual_tokens")}
    if counts["num_decodes"] + counts["num_prefills"] != seq_lens.shape[0]:
        raise ValueError(f"num_decodes ({counts['num_decodes']}) + num_prefills "
                         f"({counts['num_prefills']}) != {seq_lens.shape[0]} requests")
    if counts["num_actual_tokens"] > slots.shape[0]:
        raise ValueError(f"num_actual_tokens ({counts['num_actual_tokens']}) exceeds the "
                         f"{slots.shape[0]} token rows")
    return metadata


def build_metadata(query_lens, seq_lens, block_table, *, decode_query_len: int = 1,
                   block_size: int = 128, num_blocks: int | None = None,
                   num_tokens: int | None = None, num_reqs: int | None = None,
                   max_blocks: int | None = None) -> SparseMetadata:
    """Build the NumPy metadata of a decode-first batch.

    Args:
      query_lens: [num_reqs] new tokens of each request this step.
      seq_lens: [num_reqs] context + new tokens of each request.
      block_table: [num_reqs, max_blocks] int, logical block -> physical page.
      decode_query_len: the leading requests whose query length equals it are the decodes;
        every later request is a prefill.
      block_size: tokens per page (128).
      num_blocks: when given, the pages the sequences use must lie in [0, num_blocks).
      num_tokens: pad the token rows to this count (padding tokens write nothing and attend
        nothing); default: the sum of query_lens.
      num_reqs: pad the requests to this count with empty requests (query and sequence length
        0, block-table row of page 0). They hold no token and attend nothing; being after the
        decodes they count in `num_prefills`. Default: len(query_lens).
      max_blocks: pad the block table's width to this many columns (page 0); default: its
        width. With num_tokens, num_reqs and max_blocks fixed, every batch has the same array
        shapes, so a jitted JAX step compiles once.
    """
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size!r} is not supported; expected one of "
                         f"{SUPPORTED_BLOCK_SIZES}")
    if not isinstance(decode_query_len, (int, np.integer)) or decode_query_len < 1:
        raise ValueError(f"decode_query_len must be an int >= 1, got {decode_query_len!r}")
    q = _int_vector("query_lens", query_lens)
    s = _int_vector("seq_lens", seq_lens)
    if q.shape != s.shape:
        raise ValueError(f"query_lens has {q.shape[0]} requests but seq_lens has {s.shape[0]}")
    if (q > s).any():
        i = int(np.flatnonzero(q > s)[0])
        raise ValueError(f"request {i}: query_lens[{i}] = {q[i]} exceeds seq_lens[{i}] = {s[i]}")
    bt = np.asarray(block_table)
    if bt.ndim != 2 or bt.shape[0] != q.shape[0]:
        raise ValueError(f"block_table shape {bt.shape} does not match: expected "
                         f"[{q.shape[0]} requests, max_blocks]")
    if bt.size and not np.issubdtype(bt.dtype, np.integer):
        raise ValueError(f"block_table must hold integers, got dtype {bt.dtype}")
    if num_reqs is not None or max_blocks is not None:
        rows = q.shape[0] if num_reqs is None else int(num_reqs)
        cols = bt.shape[1] if max_blocks is None else int(max_blocks)
        if rows < q.shape[0] or cols < bt.shape[1]:
            raise ValueError(f"num_reqs / max_blocks ({rows}, {cols}) are smaller than the "
                             f"batch's {q.shape[0]} requests / block_table width {bt.shape[1]}")
        padded_bt = np.zeros((rows, cols), np.int64)
        padded_bt[:bt.shape[0], :bt.shape[1]] = bt
        bt = padded_bt
        q = np.concatenate([q, np.zeros(rows - q.shape[0], np.int64)])
        s = np.concatenate([s, np.zeros(rows - s.shape[0], np.int64)])
    num_reqs, max_blocks = bt.shape
    blocks_needed = _check_pages(bt, s, block_size, num_blocks)

    # Decode-first split: the leading run of requests with query_len == decode_query_len.
    not_decode = np.flatnonzero(q != decode_query_len)
    num_decodes = int(not_decode[0]) if not_decode.size else num_reqs
    num_actual = int(q.sum())
    padded = num_actual if num_tokens is None else int(num_tokens)
    if padded < num_actual:
        raise ValueError(f"num_tokens ({padded}) is smaller than the batch's "
                         f"{num_actual} query tokens")

    query_start_loc = np.zeros(num_reqs + 1, np.int64)
    np.cumsum(q, out=query_start_loc[1:])
    seq_start_loc = np.zeros(num_reqs + 1, np.int64)
    np.cumsum(s, out=seq_start_loc[1:])
    context = s - q
    token_to_req = np.zeros(padded, np.int64)
    token_to_req[:num_actual] = np.repeat(np.arange(num_reqs), q)
    token_positions = np.full(padded, -1, np.int64)
    token_positions[:num_actual] = (context[token_to_req[:num_actual]]
                                    + np.arange(num_actual) - query_start_loc[token_to_req[:num_actual]])
    slot_mapping = np.full(padded, -1, np.int64)
    if num_actual:
        pos = token_positions[:num_actual]
        pages = bt[token_to_req[:num_actual], pos // block_size].astype(np.int64)
        slot_mapping[:num_actual] = pages * block_size + pos % block_size

    pre = slice(num_decodes, num_reqs)
    i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    return SparseMetadata(
        seq_lens=i32(s),
        max_seq_len=int(s.max(initial=0)),
        slot_mapping=slot_mapping,
        num_actual_tokens=num_actual,
        num_decodes=num_decodes,
        num_decode_tokens=num_decodes * decode_query_len,
        num_prefills=num_reqs - num_decodes,
        num_prefill_tokens=num_actual - num_decodes * decode_query_len,
        query_start_loc=i32(query_start_loc),
        seq_start_loc=i32(seq_start_loc),
        context_lens=i32(context),
        block_table=i32(bt),
        token_to_req=i32(token_to_req),
        token_positions=i32(token_positions),
        decode_query_len=int(decode_query_len),
        max_prefill_query_len=int(q[pre].max(initial=0)),
        max_prefill_seq_len=int(s[pre].max(initial=0)),
        prefill_kv_blocks=int(blocks_needed[pre].sum()),
    )


@dataclasses.dataclass
class TopkReport:
    """What `validate_topk` found; `ok` is True when no row has a problem.

    duplicates / out_of_range: sorted lists of (kv_head, token) rows with a repeated valid entry /
    with a non-negative entry the token may not see (a future or out-of-range block).
    empty_rows: rows with no valid entry (legal: the token's output is zeros).
    """

    num_rows: int
    duplicates: list
    out_of_range: list
    empty_rows: list

    @property
    def ok(self) -> bool:
        return not self.duplicates and not self.out_of_range

    def __str__(self) -> str:
        def few(rows):
            return ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
        return (f"TopkReport({self.num_rows} rows: {len(self.duplicates)} with duplicates "
                f"[{few(self.duplicates)}], {len(self.out_of_range)} with out-of-range entries "
                f"[{few(self.out_of_range)}], {len(self.empty_rows)} empty)")


def valid_topk_mask(topk: np.ndarray, token_positions: np.ndarray, block_size: int):
    """[G, T, K] bool: entry b of row (g, t) is valid when 0 <= b < position // block_size + 1.

    Padding tokens (position -1) have no valid entry.
    """
    limit = np.where(token_positions >= 0, token_positions // block_size + 1, 0)
    return (topk >= 0) & (topk < limit[None, :, None])


def validate_topk(topk_indices, metadata: SparseMetadata, *, block_size: int = 128,
                  strict: bool = False) -> TopkReport:
    """Host-side check of a [num_kv_heads, num_tokens, topk] selection against a batch.

    Reports rows with duplicated valid entries and rows with future / out-of-range entries.
    With strict=True a report that is not `ok` raises ValueError instead.
    """
    topk = np.asarray(topk_indices)
    positions = np.asarray(metadata.token_positions)
    if topk.ndim != 3 or topk.shape[1] < positions.shape[0]:
        raise ValueError(f"topk_indices shape {topk.shape} does not match: expected "
                         f"[num_kv_heads, >= {positions.shape[0]}, topk]")
    topk = topk[:, :positions.shape[0]].astype(np.int64)
    valid = valid_topk_mask(topk, positions, block_size)
    marked = np.where(valid, topk, -1)
    srt = np.sort(marked, axis=-1)
    dup = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1)
    oor = ((topk >= 0) & ~valid).any(-1)
    empty = ~valid.any(-1)
    rows = lambda m: [tuple(int(v) for v in x) for x in np.argwhere(m)]  # noqa: E731
    report = TopkReport(num_rows=int(dup.size), duplicates=rows(dup), out_of_range=rows(oor),
                        empty_rows=rows(empty))
    if strict and not report.ok:
        raise ValueError(f"topk_indices failed validation: {report}")
    return report
