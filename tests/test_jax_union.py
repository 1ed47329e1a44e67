"""jax_sparse prefill paths: every `prefill_algorithm` (token, union, k2q, auto) against the
float64 reference; the union plan against NumPy; the dispatcher's masks; CUDA lowering of the
union kernel."""
import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, relative_error
from tests.helpers import JAX_ROWS, TOL, row_id
from tests.helpers import problem as _shared_problem
from tests.helpers import reference as _reference

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_sparse  # noqa: E402
from jax_sparse import dispatch  # noqa: E402
from jax_sparse.union import (paged_sparse_attention_union_capped, plan_union,  # noqa: E402
                              tile_tokens)


def _problem(rng, cache="auto", layout="NHD", heads=(8, 2), topk=8, scale_mode="none",
             rho=None, query_lens=None, seq_lens=None, num_tokens=None):
    """The shared mixed batch (tests/helpers.py: 40 tokens; tiles of 8 or 16 tokens straddle
    the decodes and both prefills) with a messy selection, uniform or correlated (rho)."""
    return _shared_problem(rng, cache, layout, heads, topk, scale_mode=scale_mode, rho=rho,
                           query_lens=query_lens, seq_lens=seq_lens, num_tokens=num_tokens,
                           scatter=True, future_fraction=0.4, empty_fraction=0.1)


def _check(out, ref, label, rows=None):
    """out against ref on `rows` (bool [num_tokens], default all): error and zero rows."""
    out = np.asarray(out, np.float64)
    assert out.shape == ref.shape, f"{label}: shape {out.shape}, expected {ref.shape}"
    if rows is not None:
        out, ref = out[rows], ref[rows]
    err = relative_error(out, ref)
    assert err < TOL, f"{label}: relative error {err:.3g} >= {TOL}"
    zero_rows = ~ref.any(axis=(1, 2))
    assert not out[zero_rows].any(), f"{label}: rows with no valid entry are not all zeros"


def _launcher_args(problem):
    """The arguments every path's launcher takes (scales shaped as the front end shapes them)."""
    md = interop.to_jax(problem.metadata)
    scales = [None if s is None else jnp.asarray(s, jnp.float32).reshape(
        np.shape(s) if np.ndim(s) == 2 else (1,)) for s in (problem.k_scale, problem.v_scale)]
    return (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md.token_to_req, md.token_positions,
            md.block_table, *scales)


def _run(problem, algorithm):
    md = interop.to_jax(problem.metadata)
    k_scale, v_scale = (None if s is None else jnp.asarray(s)
                        for s in (problem.k_scale, problem.v_scale))
    return jax_sparse.sparse_attention(
        problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), md, k_scale=k_scale, v_scale=v_scale,
        implementation="pallas", prefill_algorithm=algorithm)


# --- every path against the reference --------------------------------------------------------

# The union path with one spec of JAX_ROWS for every cache dtype x layout (uniform and
# correlated selections taking turns); k2q through the front end with two of them (its launcher
# runs every cache dtype x layout in tests/test_jax_k2q.py).
ROWS = {}
for row in JAX_ROWS:
    ROWS.setdefault(row[:2], row)
PATHS = ([("union", *ROWS[key][:4], (None, 0.87)[i % 2]) for i, key in enumerate(ROWS)]
         + [("k2q", *JAX_ROWS[1][:4], 0.87), ("k2q", *JAX_ROWS[4][:4], None)])


@pytest.mark.parametrize("algorithm, cache, layout, heads, scale_mode, rho", PATHS,
                         ids=[row_id(p) for p in PATHS])
def test_forced_paths_match_reference(rng, algorithm, cache, layout, heads, scale_mode, rho):
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, rho=rho)
    _check(_run(problem, algorithm), _reference(problem),
           f"{algorithm} {cache} {layout} {heads} scales={scale_mode} rho={rho}")


def test_forced_token_and_small_auto_match_reference(rng):
    problem = _problem(rng, "fp8_e4m3", "HND", (16, 1), scale_mode="per_slot", rho=0.87)
    ref = _reference(problem)
    for algorithm in ("token", "auto"):  # 40 tokens: "auto" runs as "token"
        _check(_run(problem, algorithm), ref, f"{algorithm} fp8 HND 16/1")


@pytest.mark.parametrize("k2q", [False, True], ids=["union+token", "union+k2q"])
def test_auto_splits_tiles_between_paths(rng, monkeypatch, k2q):
    """"auto" past its thresholds: small-union tiles on the union kernel, the others on k2q
    or the token kernel, decodes on the token kernel; all rows right."""
    problem = _problem(rng, "auto", "NHD", (16, 1), topk=4, rho=0.87,
                       query_lens=[1, 1, 30, 5], seq_lens=[300, 700, 1000, 5], num_tokens=40)
    spec, md = problem.spec, problem.metadata
    plan = plan_union(jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
                      jnp.asarray(np.where(np.arange(40) >= 2, md.token_positions, -1)),
                      jnp.asarray(md.block_table), num_blocks=problem.kv_cache.shape[0],
                      block_size=128, tile_tokens=tile_tokens(spec.num_queries_per_kv))
    sizes = np.asarray(plan.size).max(0)
    limit = int(sizes.min() + sizes.max()) // 2
    assert (sizes <= limit).any() and (sizes > limit).any(), f"tile unions {sizes}: one path"
    monkeypatch.setattr(dispatch, "UNION_MIN_TOKENS", 0)
    monkeypatch.setattr(dispatch, "K2Q_MIN_TOKENS", 0 if k2q else 10**9)
    monkeypatch.setattr(dispatch, "max_union", lambda *_: limit)
    out = jax.jit(lambda *a: dispatch.sparse_attention_pallas(
        *a, num_decode_tokens=jnp.int32(md.num_decode_tokens)), static_argnums=0)(
            *_launcher_args(problem))
    _check(out, _reference(problem), f"auto (k2q={k2q}) with tile unions {sizes}, max {limit}")


@pytest.mark.parametrize("path", ["token", "token-splits", "union", "k2q"])
def test_token_mask_keeps_other_rows(rng, path):
    """Each path writes exactly its masked rows: those match the reference (NaN before the
    call), every other row keeps `out`'s value bit for bit."""
    problem = _problem(rng, "fp8_e4m3", "HND", (8, 2), scale_mode="per_slot", rho=0.87)
    args = _launcher_args(problem)
    mask = rng.random(40) < 0.5
    before = rng.standard_normal(problem.query.shape).astype(problem.query.dtype)
    before[mask] = np.nan
    kw = dict(token_mask=jnp.asarray(mask), out=jnp.asarray(before))
    if path.startswith("token"):
        out = jax_sparse.paged_sparse_attention(*args, num_splits=2 if "splits" in path else 1,
                                                **kw)
    elif path == "union":
        out = jax_sparse.paged_sparse_attention_union(*args, **kw)
    else:
        out = jax_sparse.paged_sparse_attention_k2q(*args, **kw)
    out = np.asarray(out)
    _check(out, _reference(problem), f"{path} masked rows", rows=mask)
    assert np.array_equal(out[~mask].view(np.uint16), before[~mask].view(np.uint16)), \
        f"{path}: rows outside token_mask changed"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, scale_mode", [("fp8_e4m3", "per_slot"), ("fp8_e5m2", "scalar")])
def test_union_packed_fp8_cache(rng, layout, cache, scale_mode):
    """The union kernel with the FP8 cache as uint16 pairs (caches past 2^31 elements)."""
    problem = _problem(rng, cache, layout, (16, 1), scale_mode=scale_mode, rho=0.87)
    out = jax_sparse.paged_sparse_attention_union(*_launcher_args(problem), force_packed=True)
    _check(out, _reference(problem), f"union packed {cache} {layout}")


def test_union_chunks(rng, monkeypatch):
    """Plans made over several chunks of tokens (the last one overlapping the one before)."""
    import jax_sparse.union as union
    problem = _problem(rng, "auto", "NHD", (8, 2), rho=0.87)
    monkeypatch.setattr(interop.tiling, "UNION_PLAN_BYTES",
                        interop.tiling.UNION_PLAN_BYTES_PER_ENTRY * 2 * 8 * 16 * 2)
    assert union.tokens_per_chunk(2, 8, 16) == 32  # 40 tokens: chunks at 0 and 8
    out = union.paged_sparse_attention_union(*_launcher_args(problem))
    _check(out, _reference(problem), "union in two chunks")


def test_union_capped_leaves_large_tiles(rng):
    """Tiles whose union exceeds max_union are left (reported, rows untouched)."""
    problem = _problem(rng, "auto", "NHD", (16, 1), rho=0.87)
    md = problem.metadata
    tokens = tile_tokens(16)
    plan = plan_union(jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
                      jnp.asarray(md.token_positions), jnp.asarray(md.block_table),
                      num_blocks=problem.kv_cache.shape[0], block_size=128, tile_tokens=tokens)
    sizes = np.asarray(plan.size).max(0)
    limit = int(sizes.min() + sizes.max()) // 2
    large = np.repeat(sizes > limit, tokens)[:40]
    assert large.any() and not large.all(), f"tile unions {sizes}, max {limit}: one path"
    out, left = paged_sparse_attention_union_capped(*_launcher_args(problem), max_union=limit)
    assert np.array_equal(np.asarray(left), large), f"left {np.asarray(left)}, expected {large}"
    out = np.asarray(out, np.float64)
    assert not out[large].any(), "rows of left tiles were written"
    _check(out, _reference(problem), f"capped union, max {limit}", rows=~large)


# --- the union plan against NumPy -----------------------------------------------------------

def test_plan_union_matches_numpy(rng):
    problem = _problem(rng, "auto", "NHD", (8, 2), topk=8, rho=0.87)
    md, topk = problem.metadata, problem.topk_indices
    num_blocks = problem.kv_cache.shape[0]
    table = md.block_table.copy()
    table[3, 1] = -5  # a page outside the cache: never an entry
    mask = rng.random(40) < 0.8
    tokens = tile_tokens(4)
    plan = plan_union(jnp.asarray(topk), jnp.asarray(md.token_to_req),
                      jnp.asarray(md.token_positions), jnp.asarray(table),
                      num_blocks=num_blocks, block_size=128, tile_tokens=tokens,
                      token_mask=jnp.asarray(mask))
    page, block, bits, size = map(np.asarray, plan)
    num_tiles = -(-40 // tokens)
    assert page.shape == (2, num_tiles, tokens * 8) and size.shape == (2, num_tiles)
    for g in range(2):
        for i in range(num_tiles):
            want = {}
            for j, t in enumerate(range(i * tokens, min(40, (i + 1) * tokens))):
                pos = md.token_positions[t]
                for b in topk[g, t]:
                    if not (mask[t] and 0 <= b <= pos // 128 and b < table.shape[1]):
                        continue
                    p = table[md.token_to_req[t], b]
                    if 0 <= p < num_blocks:
                        want[(p, b)] = want.get((p, b), 0) | (1 << j)
            keys = sorted(want)
            n = len(keys)
            got = list(zip(page[g, i, :n], block[g, i, :n]))
            assert size[g, i] == n and got == keys, f"tile {i} head {g}: {got} != {keys}"
            assert list(bits[g, i, :n]) == [want[k] for k in keys], f"tile {i} head {g}: bits"
            assert (page[g, i, n:] == -1).all() and not bits[g, i, n:].any(), \
                f"tile {i} head {g}: entries past the union"


def test_no_recompile_across_batches_union(rng):
    """The decode count is traced: batches with other decode/prefill splits reuse the code."""
    from tests.helpers import MIXED_BATCHES, same_shape_batches as _same_shape_batches
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4)
    traces = []

    @jax.jit
    def step(query, kv_cache, topk, metadata):
        traces.append(1)  # runs once per trace, not per call
        return jax_sparse.sparse_attention(spec, query, kv_cache, topk, metadata,
                                           implementation="pallas", prefill_algorithm="union")

    for i, (query, cache, topk, md) in enumerate(_same_shape_batches(rng, spec, MIXED_BATCHES)):
        out = step(jnp.asarray(query), jnp.asarray(cache), jnp.asarray(topk), interop.to_jax(md))
        _check(out, interop.reference_attention(spec, query, cache, topk, md),
               f"union batch {i} ({md.num_decode_tokens} decode tokens)")
    assert len(traces) == 1 and step._cache_size() == 1, \
        f"union: traced {len(traces)} times, {step._cache_size()} compilations for 4 batches"


# --- public boundary -------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_unknown_prefill_algorithm_raises(rng, impl):
    problem = _problem(rng)
    md = interop.to_jax(problem.metadata)
    with pytest.raises(ValueError, match=r"prefill_algorithm 'fast' is unknown; expected one"):
        jax.eval_shape(lambda q, c, t: jax_sparse.sparse_attention(
            problem.spec, q, c, t, md, implementation=impl, prefill_algorithm="fast"),
            jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices))
    pre = problem.metadata.prefill
    with pytest.raises(ValueError, match=r"prefill_algorithm 'k2' is unknown"):
        jax_sparse.minimax_m3_sparse_attn(
            jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), jnp.asarray(pre.block_table),
            jnp.asarray(pre.cu_seqlens_q), jnp.asarray(pre.seq_lens),
            jnp.asarray(pre.context_lens), pre.max_query_len, 2, None, implementation=impl,
            prefill_algorithm="k2")


def test_seed_prefill_call_with_union(rng):
    problem = _problem(rng, "fp8_e4m3", "NHD", (16, 1), scale_mode="per_slot",
                       query_lens=[20, 7], seq_lens=[300, 7], num_tokens=32)
    pre, spec = problem.metadata.prefill, problem.spec
    out = jax_sparse.minimax_m3_sparse_attn(
        jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), jnp.asarray(pre.block_table),
        jnp.asarray(pre.cu_seqlens_q), jnp.asarray(pre.seq_lens), jnp.asarray(pre.context_lens),
        pre.max_query_len, spec.num_kv_heads, spec.scale, jnp.asarray(problem.k_scale),
        jnp.asarray(problem.v_scale), prefill_algorithm="union")
    _check(out, _reference(problem), "seed prefill call, union")


# --- CUDA lowering (no GPU needed) -----------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, packed", [("auto", False), ("fp8_e4m3", False),
                                           ("fp8_e5m2", False), ("fp8_e4m3", True)])
def test_union_lowers_for_cuda(layout, cache, packed):
    """The union kernel lowers through Pallas' Triton backend for CUDA."""
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    query_dtype = matching_query_dtype(cache)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    scale = sds((4, 40 * 128), jnp.float32) if cache.startswith("fp8") else None
    args = (sds((40, 64, 128), query_dtype),
            sds(spec.physical_kv_cache_shape(40), spec.cache_storage_dtype(query_dtype)),
            sds((4, 40, 16), i32), sds((40,), i32), sds((40,), i32), sds((2, 20), i32), scale,
            scale, sds((40,), bool))

    def call(*a):
        return jax_sparse.paged_sparse_attention_union(
            spec, *a[:-1], token_mask=a[-1], interpret=False, force_packed=packed)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "sparse_attention_union" in text and "triton" in text.lower(), \
        "no Triton union kernel in the CUDA lowering"


def test_auto_dispatch_lowers_for_cuda():
    """A batch past both "auto" thresholds: token, union and k2q kernels lower together."""
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16)
    n = dispatch.K2Q_MIN_TOKENS
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    args = (sds((n, 64, 128), jnp.bfloat16), sds(spec.physical_kv_cache_shape(64), jnp.bfloat16),
            sds((4, n, 16), i32), sds((n,), i32), sds((n,), i32), sds((4, 64), i32))

    def call(*a):
        return dispatch.sparse_attention_pallas(spec, *a, num_decode_tokens=jnp.int32(3),
                                                interpret=False)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("sparse_attention_union", "k2q_block", "sparse_attention_NHD"):
        assert name in text, f"no {name} kernel in the auto dispatch's CUDA lowering"
