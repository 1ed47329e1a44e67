"""jax_sparse.k2q: the key-to-query prefill path (plan, Pallas block kernel, combine) against
the float64 reference, its plan against a NumPy inversion, and its CUDA lowering."""
import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, poison_unused_slots
from tests.helpers import JAX_ROWS, TOL, relative_error, row_id
from tests.helpers import problem as _shared_problem
from tests.helpers import reference as _reference

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_sparse import k2q  # noqa: E402
from tests.device_reference import jax_reference  # noqa: E402


def _problem(rng, cache="auto", layout="NHD", heads=(8, 2), topk=8, rho=None,
             query_lens=None, seq_lens=None, **kw):
    """The shared mixed batch (tests/helpers.py: 3 decodes, a prefill chunk past a context
    and one from position 0, padding), uniform or M3-like correlated (rho) selections."""
    if query_lens is not None:
        kw.setdefault("num_tokens", sum(query_lens) + 5)
    return _shared_problem(rng, cache, layout, heads, topk, rho=rho, query_lens=query_lens,
                           seq_lens=seq_lens, **kw)


def _scale(s):
    """The launcher's scale operand: None, [1] or [num_kv_heads, num_slots] float32."""
    return None if s is None else jnp.asarray(np.asarray(s, np.float32).reshape(
        np.shape(s) or (1,)))


def _run(problem, token_mask=None, out=None, force_packed=False):
    md = interop.to_jax(problem.metadata)

    @jax.jit
    def call(query, kv_cache, topk, token_mask, out, k_scale, v_scale):
        return k2q.paged_sparse_attention_k2q(
            problem.spec, query, kv_cache, topk, md.token_to_req, md.token_positions,
            md.block_table, k_scale, v_scale, token_mask=token_mask, out=out,
            force_packed=force_packed)

    return call(jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
                jnp.asarray(problem.topk_indices),
                None if token_mask is None else jnp.asarray(token_mask),
                None if out is None else jnp.asarray(out),
                _scale(problem.k_scale), _scale(problem.v_scale))


def _check(out, problem, label, token_mask=None, kept=None, ref=None):
    """Rows in token_mask match the reference (default: the problem's; rows with no valid
    entry: exact zeros); the others equal `kept` bit for bit (zeros when None)."""
    out = np.asarray(out, np.float64)
    ref = _reference(problem) if ref is None else ref
    assert out.shape == ref.shape, f"{label}: shape {out.shape}, expected {ref.shape}"
    mine = np.ones(len(ref), bool) if token_mask is None else np.asarray(token_mask)
    err = relative_error(out[mine], ref[mine])
    zero_rows = mine & ~ref.any(axis=(1, 2))
    other = np.zeros_like(out[~mine]) if kept is None else np.asarray(kept, np.float64)[~mine]
    assert err < TOL and not out[zero_rows].any() and np.array_equal(out[~mine], other), (
        f"{label}: relative error {err:.3g} (tol {TOL}), nonzero rows with no valid entry: "
        f"{int(np.count_nonzero(out[zero_rows].any(axis=(1, 2))))}, rows outside the mask "
        f"changed: {int(np.count_nonzero((out[~mine] != other).any(axis=(1, 2))))}")


def _poisoned_out(problem, rng, token_mask):
    """Other paths' rows random, this path's rows NaN (every one must be overwritten)."""
    out = rng.standard_normal(problem.query.shape).astype(problem.query.dtype)
    out[np.asarray(token_mask)] = np.nan
    return out


# --- parity with the float64 reference -------------------------------------------------------

# One spec of JAX_ROWS for every cache dtype x layout (both FP8 formats with each scale mode),
# and a GQA group that is not a power of two (12/2, padded to 16 rows per token).
ROWS = {}
for row in JAX_ROWS:
    ROWS.setdefault(row[:2], row[:4])
CASES = [*ROWS.values(), ("fp8_e4m3", "NHD", (12, 2), "none")]


@pytest.mark.parametrize("cache, layout, heads, scale_mode", CASES,
                         ids=[row_id(c) for c in CASES])
def test_parity_every_token(rng, cache, layout, heads, scale_mode):
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, scatter=True,
                       future_fraction=0.4, empty_fraction=0.1)
    _check(_run(problem), problem, f"{cache} {layout} {heads} scales={scale_mode}")


@pytest.mark.parametrize("heads, layout", [((8, 2), "NHD"), ((16, 1), "HND")])
def test_prefill_tokens_of_a_mixed_batch(rng, heads, layout):
    """token_mask = the prefill tokens (padding included), `out` holding the decode rows."""
    problem = _problem(rng, "fp8_e4m3", layout, heads, scale_mode="per_slot", scatter=True,
                       future_fraction=0.3)
    mask = np.arange(problem.metadata.num_tokens) >= problem.metadata.num_decode_tokens
    out = _poisoned_out(problem, rng, mask)
    _check(_run(problem, mask, out), problem, f"prefill rows {heads} {layout}", mask, out)


@pytest.mark.parametrize("with_out", [True, False], ids=["out", "no_out"])
def test_token_mask_subset(rng, with_out):
    """Any subset of rows (a dispatcher's per-tile choice); the rest kept or zeros."""
    problem = _problem(rng, heads=(16, 4), scatter=True, future_fraction=0.3,
                       empty_fraction=0.1)
    mask = rng.random(problem.metadata.num_tokens) < 0.5
    out = _poisoned_out(problem, rng, mask) if with_out else None
    _check(_run(problem, mask, out), problem, f"random subset, out={with_out}", mask, out)


@pytest.mark.parametrize("cache, scale_mode, layout", [("fp8_e4m3", "per_slot", "NHD"),
                                                       ("fp8_e5m2", "scalar", "HND")])
def test_packed_fp8_cache(rng, cache, scale_mode, layout):
    """The uint16-pair path FP8 caches past 2^31 elements take, on a small cache."""
    problem = _problem(rng, cache, layout, (8, 2), scale_mode=scale_mode, scatter=True,
                       future_fraction=0.3, empty_fraction=0.1)
    _check(_run(problem, force_packed=True), problem, f"packed {cache} {layout}")


@pytest.mark.parametrize("heads", [(8, 2), (16, 1)], ids=["gqa4", "gqa16"])
def test_correlated_selection(rng, heads):
    """M3-like overlap (rho 0.87): long segments, several work items per page."""
    problem = _problem(rng, heads=heads, topk=16, rho=0.87)
    _check(_run(problem), problem, f"rho=0.87 {heads}")


def test_forced_tiny_chunks(rng, monkeypatch):
    """Chunks of a few tokens (the last one overlapping the one before) give the same rows."""
    problem = _problem(rng, "fp8_e5m2", "HND", (8, 2), scale_mode="per_slot", scatter=True,
                       future_fraction=0.3, empty_fraction=0.1)
    monkeypatch.setattr(k2q, "tokens_per_chunk", lambda spec, partial_bytes: 7)
    mask = np.arange(problem.metadata.num_tokens) % 3 != 1
    out = _poisoned_out(problem, rng, mask)
    _check(_run(problem, mask, out), problem, "7-token chunks", mask, out)


def test_nan_outside_attended_keys_is_ignored(rng):
    """Slots no token may attend (past each request's end, spare pages) hold NaN."""
    problem = _problem(rng, "fp8_e4m3", scatter=True, future_fraction=0.5)
    ref = _reference(problem)
    poison_unused_slots(problem)
    _check(_run(problem), problem, "NaN-poisoned unused slots", ref=ref)


def test_garbage_topk_and_block_table(rng):
    """Entries and pages outside every range are skipped, never followed."""
    problem = _problem(rng, scatter=True)
    topk = problem.topk_indices
    junk = rng.choice(np.array([2**31 - 1, -2**31, -7, 10**6], np.int32), topk.shape)
    problem.topk_indices = np.where(topk == -1, junk, topk).astype(np.int32)
    table = problem.metadata.block_table.copy()
    num_blocks = problem.kv_cache.shape[0]
    table[3, 1], table[3, 2], table[2, 4] = num_blocks + 5, -3, 2**31 - 1
    problem.metadata = problem.metadata.replace(block_table=table)
    _check(_run(problem), problem, "garbage top-k and block table")


def test_empty_rows_and_padding_give_zeros(rng):
    problem = _problem(rng, empty_fraction=1.0)
    out = np.asarray(_run(problem), np.float64)
    assert np.isfinite(out).all() and not out.any(), "rows with no entry are not all zeros"


# --- the plan against a NumPy inversion -------------------------------------------------------

def _numpy_pairs(topk, req, pos, table, num_blocks, mask, block_size=128):
    """Valid [G, n, K] and the CSR pairs (key, token, column, limit) in (key, token, column)
    order, straight from the contract's rule."""
    num_kv_heads, n, width = topk.shape
    num_reqs, max_blocks = table.shape
    valid = np.zeros(topk.shape, bool)
    pairs = []
    for g in range(num_kv_heads):
        for t in range(n):
            if not mask[t] or pos[t] < 0:
                continue
            r = min(max(req[t], 0), num_reqs - 1)
            for k in range(width):
                b = int(topk[g, t, k])
                if b in topk[g, t, :k]:  # a repeated block counts once (contract, 5)
                    continue
                if 0 <= b <= pos[t] // block_size and b < max_blocks:
                    page = int(table[r, b])
                    if 0 <= page < num_blocks:
                        valid[g, t, k] = True
                        pairs.append((g * num_blocks + page, t, k, pos[t] - b * block_size))
    return valid, sorted(pairs)


@pytest.mark.parametrize("pairs_per_item", [1, 3, 8])
def test_plan_matches_numpy_inversion(rng, pairs_per_item):
    problem = _problem(rng, heads=(8, 2), topk=16, rho=0.87)
    md = problem.metadata
    topk = _problem(rng, heads=(8, 2), topk=16, scatter=True, future_fraction=0.5,
                    empty_fraction=0.1).topk_indices
    topk = np.where(rng.random(topk.shape) < 0.5, topk, problem.topk_indices)  # both kinds
    table = md.block_table.copy()
    num_blocks = problem.kv_cache.shape[0]
    table[3, 0], table[4, 0] = num_blocks, -1  # pages outside the cache: invalid
    mask = rng.random(md.num_tokens) < 0.8
    plan = jax.jit(lambda *a, **kw: k2q.plan_k2q(
        *a, num_blocks=num_blocks, block_size=128, pairs_per_item=pairs_per_item, **kw))(
        jnp.asarray(topk), jnp.asarray(md.token_to_req), jnp.asarray(md.token_positions),
        jnp.asarray(table), token_mask=jnp.asarray(mask))
    plan = jax.tree.map(np.asarray, plan)
    valid, pairs = _numpy_pairs(topk, md.token_to_req, md.token_positions, table, num_blocks,
                                mask)
    e = len(pairs)
    got = list(zip(*(x[:e].tolist() for x in (plan.pair_key, plan.pair_token,
                                                plan.pair_column, plan.pair_limit))))
    sentinel = topk.shape[0] * num_blocks
    starts = [i for i in range(e) if i == 0 or pairs[i][0] != pairs[i - 1][0]]
    segment_first = np.maximum.accumulate(np.isin(np.arange(e), starts) * np.arange(e))
    items = [i for i in range(e) if (i - segment_first[i]) % pairs_per_item == 0]
    assert np.array_equal(plan.valid, valid), "valid entries differ"
    assert got == [tuple(map(int, p)) for p in pairs], "CSR pairs differ"
    assert (plan.pair_key[e:] == sentinel).all(), "pairs past the valid ones are not sentinels"
    assert plan.item_start.shape[0] >= len(items), "the static item bound is too small"
    assert plan.item_start[:len(items)].tolist() == items, "work items differ"
    assert (plan.item_start[len(items):] == -1).all(), "surplus work items are not -1"


# --- CUDA lowering (no GPU needed) ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, packed", [("auto", False), ("fp8_e4m3", False),
                                           ("fp8_e5m2", True)])
def test_pallas_lowers_for_cuda(layout, cache, packed):
    """The block kernel lowers through Pallas' Triton backend for CUDA at M3 shapes."""
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    query_dtype = matching_query_dtype(cache)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    scale = sds((4, 40 * 128), jnp.float32) if cache.startswith("fp8") else None
    args = (sds((8, 64, 128), query_dtype),
            sds(spec.physical_kv_cache_shape(40), spec.cache_storage_dtype(query_dtype)),
            sds((4, 8, 16), i32), sds((8,), i32), sds((8,), i32), sds((2, 20), i32),
            scale, scale, sds((8,), jnp.bool_), sds((8, 64, 128), query_dtype))

    def call(*a):
        return k2q.paged_sparse_attention_k2q(spec, *a[:8], token_mask=a[8], out=a[9],
                                              interpret=False, force_packed=packed)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower(), "no Triton kernel in the CUDA lowering"


# --- GPU: compiled Pallas (Triton) at MiniMax-M3 shapes ----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs JAX on a GPU")
@pytest.mark.parametrize("heads", [(64, 4), (16, 1)], ids=["64_4", "16_1"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, packed", [("auto", False), ("fp8_e4m3", False),
                                           ("fp8_e4m3", True)])
def test_gpu_m3_shapes(rng, heads, layout, cache, packed):
    """Prefill rows of a mixed batch (M3-like overlapping selections), `out` holding the rest."""
    problem = _problem(rng, cache, layout, heads, topk=16, rho=0.87,
                       query_lens=[1] * 6 + [700, 300],
                       seq_lens=[32768, 9000, 129, 2000, 20000, 5, 4700, 300],
                       scale_mode="per_slot" if cache != "auto" else "none")
    md = problem.metadata
    mask = np.arange(md.num_tokens) >= md.num_decode_tokens
    out = _poisoned_out(problem, rng, mask)
    ref = jax_reference(problem.spec, problem.query, problem.kv_cache, problem.topk_indices, md,
                        problem.k_scale, problem.v_scale)  # float32 on the device
    _check(_run(problem, mask, out, force_packed=packed), problem,
           f"gpu {cache} packed={packed} {layout} {heads}", mask, out, ref=ref)
