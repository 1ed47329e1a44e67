"""What the test modules share: the random problems they build, the float64 reference of a
problem, the closeness check, junk selections, batches of one padded shape, and each front
end's view of a problem.

Imports neither framework at module level (JAX-only and PyTorch-only modules both use it);
`torch_inputs` and `jax_run` import theirs when called. Test data itself (batches, caches,
selections) comes from `interop.testing`, which the demo and the benchmarks use too.

Shapes: every distinct shape is a new Pallas interpret-mode compile, and every token, KV head
and top-k column is Python work in the Triton interpreter, so the interpreted tests share one
small mixed batch (`QUERY_LENS`, `SEQ_LENS`, `NUM_TOKENS`) with head size and block size at the
real 128; the GPU tests use MiniMax-M3's shapes.
"""
from __future__ import annotations

import numpy as np

import interop
from interop.testing import (NUMPY_DTYPES, make_topk, matching_query_dtype, random_problem,
                             relative_error)

# bf16/fp16 queries and softmax weights in the dot products; FP8 values are exact in bf16 and
# fp16 and the scales apply in fp32, so one bound holds for every cache dtype.
TOL = 1e-2
# The interpreted tests' mixed decode-first batch: 3 decodes (one at a block edge), a 24-token
# prefill chunk crossing a block edge (positions 516..539), a 9-token request from position 0,
# then 4 padding tokens. Tiles of 8 or 16 tokens straddle the decodes and both prefills.
QUERY_LENS, SEQ_LENS, NUM_TOKENS = [1, 1, 1, 24, 9], [300, 129, 600, 540, 9], 40
# The same with speculative decodes of 2 tokens each.
SPEC_QUERY_LENS, SPEC_SEQ_LENS = [2, 2, 2, 23, 9], [300, 130, 600, 540, 9]
# The JAX tests' specs on that batch (top-k 8): every cache dtype in both layouts, each FP8
# format with every scale mode, GQA groups 4 (two and four KV heads) and 16, speculative decodes
# (L = 2, on SPEC_QUERY_LENS: the same padded shapes) and the token kernel's split counts taking
# turns. Tests that share a row's spec and the batch's shapes share its compiled functions.
# (cache, layout, heads, scale_mode, decode_query_len, num_splits)
JAX_ROWS = [
    ("auto", "NHD", (8, 2), "none", 1, None),
    ("auto", "HND", (16, 1), "none", 2, 2),
    ("float16", "NHD", (16, 1), "none", 1, 1),
    ("float16", "HND", (16, 4), "none", 2, None),
    ("fp8_e4m3", "NHD", (8, 2), "per_slot", 2, 4),
    ("fp8_e4m3", "HND", (16, 1), "scalar", 1, 8),
    ("fp8_e4m3", "HND", (8, 2), "none", 2, 1),
    ("fp8_e5m2", "NHD", (16, 1), "scalar", 1, None),
    ("fp8_e5m2", "HND", (8, 2), "per_slot", 2, 2),
    ("fp8_e5m2", "NHD", (16, 4), "none", 1, 4),
]


def row_id(row) -> str:
    return "-".join(str(v).replace(" ", "") for v in row)


def spec(heads=(8, 2), cache="auto", layout="NHD", topk=8, **kw) -> interop.SparseAttentionSpec:
    return interop.SparseAttentionSpec(*heads, topk_blocks=topk, kv_cache_dtype=cache,
                                       kv_cache_layout=layout, **kw)


def problem(rng, cache="auto", layout="NHD", heads=(8, 2), topk=8, *, query_lens=None,
            seq_lens=None, num_tokens=None, query_dtype=None, rho=None, decode_query_len=1,
            **kw):
    """A random batch (`interop.testing.random_problem`) over `spec(heads, cache, layout,
    topk)`; default the shared mixed batch padded to NUM_TOKENS rows (with decodes of
    `decode_query_len` 1 or 2). The query dtype defaults to `matching_query_dtype(cache)`.
    rho: an M3-like correlated selection (with the same scatter / future_fraction /
    empty_fraction) instead of the uniform one."""
    if query_lens is None:
        query_lens, seq_lens = ((QUERY_LENS, SEQ_LENS) if decode_query_len == 1
                                else (SPEC_QUERY_LENS, SPEC_SEQ_LENS))
        num_tokens = NUM_TOKENS if num_tokens is None else num_tokens
    kw["decode_query_len"] = decode_query_len
    p = random_problem(spec(heads, cache, layout, topk), query_lens, seq_lens, rng,
                       query_dtype=query_dtype or matching_query_dtype(cache),
                       num_tokens=num_tokens, rho=rho, **kw)
    return p


def reference(problem, topk=None, metadata=None, *, kv_cache=None):
    """The float64 reference of `problem`, optionally with another selection, metadata or
    cache (the problem's own scales)."""
    return interop.reference_attention(
        problem.spec, problem.query, problem.kv_cache if kv_cache is None else kv_cache,
        problem.topk_indices if topk is None else topk,
        problem.metadata if metadata is None else metadata, problem.k_scale, problem.v_scale)


def to_numpy64(x) -> np.ndarray:
    """Any front end's output as float64 NumPy."""
    from interop.arrays import to_float64
    return to_float64(x)


def check(out, ref, label, *, rows=None, kept=None, tol=TOL):
    """`out` (any framework's array) against `ref` (float64) on `rows` (bool [num_tokens];
    default all): relative error under `tol`, and exact zeros where `ref` is all zeros (rows
    with no valid entry, padding). kept: the rows outside `rows` must equal it bit for bit
    (NaN equal to NaN: an untouched poisoned output)."""
    out = to_numpy64(out)
    assert out.shape == ref.shape, f"{label}: shape {out.shape}, expected {ref.shape}"
    mine = np.ones(len(ref), bool) if rows is None else np.asarray(rows, bool)
    err = relative_error(out[mine], ref[mine])
    assert err < tol, f"{label}: relative error {err:.3g} (limit {tol})"
    zero_rows = mine & ~ref.any(axis=(1, 2))
    assert not out[zero_rows].any(), f"{label}: rows with no valid entry are not all zeros"
    if kept is not None:
        other = to_numpy64(kept)[~mine]
        same = np.array_equal(out[~mine], other, equal_nan=True)
        assert same, f"{label}: rows outside the call changed"


def garbage_topk(problem, rng):
    """Every -1 replaced by junk that is never valid: huge, negative, future, past the
    block table. Entries stay distinct (a future block appears at most once per row)."""
    topk = problem.topk_indices.copy()
    limit = np.maximum(np.asarray(problem.metadata.token_positions) // 128 + 1, 0)
    max_blocks = problem.metadata.block_table.shape[1]
    junk = np.stack(np.broadcast_arrays(
        np.int32(2**31 - 1), np.int32(-2**31), np.int32(-7), limit[None, :, None],
        limit[None, :, None] + 40, np.int32(max_blocks), np.int32(max_blocks + 3),
        np.zeros(topk.shape, np.int32)), axis=-1)[..., :7]
    pick = rng.integers(0, junk.shape[-1], topk.shape)
    junk = np.take_along_axis(junk, pick[..., None], -1)[..., 0]
    return np.where(topk == -1, junk, topk).astype(np.int32)


def garbage_block_table(problem, rows=((0, 0), (3, 1), (2, 4))):
    """The problem's metadata with three block-table entries a token may see pointing
    outside the cache (past its end, negative, INT32_MAX)."""
    table = problem.metadata.block_table.copy()
    num_blocks = problem.kv_cache.shape[0]
    for (r, b), page in zip(rows, (num_blocks + 5, -3, 2**31 - 1)):
        table[r, b] = page
    return problem.metadata.replace(block_table=table)


# Batches of one padded shape (24 tokens, 4 requests, 6 blocks a row, 24 pages): a jitted
# caller must not recompile across them. (query_lens, seq_lens, decode_query_len)
MIXED_BATCHES = [([1, 1, 1, 1], [5, 300, 129, 700], 1),
                 ([1, 1, 9, 13], [640, 2, 200, 13], 1),
                 ([2, 2, 2, 2], [130, 256, 3, 500], 2),
                 ([20, 1, 1, 1], [600, 40, 7, 128], 1)]
DECODE_BATCHES = [([1] * 4, [5, 300, 129, 700], 1), ([1] * 4, [640, 2, 200, 13], 1),
                  ([1] * 4, [128, 129, 1, 700], 1)]


def same_shape_batches(rng, spec, shapes, num_tokens=24, num_reqs=4, max_blocks=6,
                       num_blocks=24):
    """Batches that differ in everything but the padded sizes: decode/prefill split, lengths,
    contexts, block tables. Yields (query, cache, topk, metadata) as NumPy."""
    cache = rng.standard_normal(spec.physical_kv_cache_shape(num_blocks)).astype(
        NUMPY_DTYPES["bfloat16"])
    query = rng.standard_normal((num_tokens, spec.num_heads, spec.head_size)).astype(
        NUMPY_DTYPES["bfloat16"])
    for query_lens, seq_lens, decode_query_len in shapes:
        table = np.full((num_reqs, max_blocks), -1, np.int32)
        pages = rng.permutation(num_blocks)
        needed = -(-np.asarray(seq_lens) // spec.block_size)
        for r, n in enumerate(needed):
            table[r, :n] = pages[needed[:r].sum():needed[:r].sum() + n]
        md = interop.build_metadata(query_lens, seq_lens, table, num_tokens=num_tokens,
                                    decode_query_len=decode_query_len, num_blocks=num_blocks)
        topk = make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng, scatter=True)
        yield query, cache, topk, md


# --- PyTorch ------------------------------------------------------------------------------------

def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_inputs(problem, device=None) -> dict:
    """The problem's inputs as PyTorch tensors on `device` (default: CUDA when present): the
    cache as the logical view, scales as tensors (a float stays a float)."""
    import torch
    device = device or torch_device()

    def scale(s):
        return torch.from_numpy(s).to(device) if isinstance(s, np.ndarray) else s
    return dict(query=interop.to_torch(problem.query, device),
                kv_cache=interop.kv_cache_to_torch(problem.kv_cache, problem.spec).to(device),
                topk=interop.to_torch(problem.topk_indices, device),
                metadata=interop.to_torch(problem.metadata, device),
                k_scale=scale(problem.k_scale), v_scale=scale(problem.v_scale))


def torch_run(problem, impl=None, prefill_algorithm="auto", **overrides):
    """torch_sparse.sparse_attention on the problem into a NaN-filled output (an unwritten
    element fails); `overrides` replace torch_inputs' entries."""
    import torch

    import torch_sparse
    t = {**torch_inputs(problem), **overrides}
    out = torch.full_like(t["query"], float("nan"))
    result = torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                           t["metadata"], out, k_scale=t["k_scale"],
                                           v_scale=t["v_scale"], impl=impl,
                                           prefill_algorithm=prefill_algorithm)
    assert result is out
    return out


# --- JAX ----------------------------------------------------------------------------------------

def jax_scales(problem):
    """The problem's scales as JAX arrays (None stays None)."""
    import jax.numpy as jnp
    return [None if s is None else jnp.asarray(s) for s in (problem.k_scale, problem.v_scale)]


def jax_launcher_scales(problem):
    """Scales as the front end hands them to a kernel launcher: None, [1] or [num_kv_heads,
    num_slots] float32."""
    import jax.numpy as jnp
    return [None if s is None else jnp.asarray(np.asarray(s, np.float32).reshape(
        np.shape(s) or (1,))) for s in (problem.k_scale, problem.v_scale)]


def jax_launcher_args(problem):
    """The arguments every path's launcher takes: (spec, query, cache, topk, token_to_req,
    token_positions, block_table, k_scale, v_scale)."""
    import jax.numpy as jnp
    md = interop.to_jax(problem.metadata)
    n = problem.query.shape[0]
    return (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md.token_to_req[:n], md.token_positions[:n],
            md.block_table, *jax_launcher_scales(problem))


def jax_run(problem, impl, **kw):
    """jax_sparse.sparse_attention on the problem with `implementation=impl`."""
    import jax.numpy as jnp

    import jax_sparse
    k_scale, v_scale = jax_scales(problem)
    return jax_sparse.sparse_attention(
        problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), interop.to_jax(problem.metadata), k_scale=k_scale,
        v_scale=v_scale, implementation=impl, **kw)


def jax_device_reference(problem):
    """The problem's float32 reference on JAX's default device (tests/device_reference.py): the
    GPU tests' reference at MiniMax-M3 shapes, where the float64 one takes 5 to 40 s a case on
    the host. It follows the contract except for non-finite query rows (NaN / Inf scores give
    zeros there, not NaN): a test with those derives their rows itself."""
    from tests.device_reference import jax_reference
    return jax_reference(problem.spec, problem.query, problem.kv_cache, problem.topk_indices,
                         problem.metadata, problem.k_scale, problem.v_scale)


def tile_neighbours(bad_rows, group: int, tile: int):
    """[tokens, heads] bool: rows of tokens within `tile` tokens of a row in bad_rows, in the
    same KV head group. Where rows of a union tile attend different keys of a loaded page, a
    non-finite V value one row attends reaches the tile's other rows (README, "Bad input")."""
    near = np.zeros_like(bad_rows)
    for t, h in np.argwhere(bad_rows):
        g = h // group
        near[max(0, t - tile + 1):t + tile, g * group:(g + 1) * group] = True
    return near
