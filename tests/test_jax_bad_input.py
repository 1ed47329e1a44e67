"""Garbage in, the same answer out (CONTRACT.md section 5, issue 18) on every JAX path.

Every case runs every implementation that runs on CPU: "pallas" with every prefill_algorithm
(Triton-backend Pallas in interpret mode: the token kernel with one split and with several,
"union", "k2q", and "auto" with its thresholds lowered so that one call mixes the union, k2q
and token kernels), "tpu" (Pallas TPU in interpret mode) and "xla" (each runs one kernel for
every prefill_algorithm: called once); and compares each with the float64
`interop.reference_attention`; on a Hopper GPU "mosaic" too (the Pallas kernels then run
compiled). On CPU "mosaic" cannot run: its plan (the repeats rule) and its split merge (the NaN
rule) are the shared code tested here, and tests/test_jax_mosaic.py lowers its kernel for CUDA.

Rows are compared as the contract states them: a row is NaN when the reference row holds a
NaN (a path may spread the NaN over the whole row), zeros where the reference has zeros, and
within TOL of the reference elsewhere.
"""
import functools

import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, poison_unused_slots, random_problem
from interop.tiling import union_tile_tokens

from .helpers import tile_neighbours

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_sparse  # noqa: E402
from jax_sparse import dispatch, mosaic  # noqa: E402
from jax_sparse.attention import _merge_splits, normalize  # noqa: E402
from jax_sparse.union import plan_union, tile_tokens  # noqa: E402
from jax_sparse.validation import check_scale  # noqa: E402

TOL = 1e-2  # bf16/fp16 queries and P in the dot products
# A mixed decode-first batch: 2 decodes, 2 prefill chunks (one from position 0, one after a
# context), padded to 40 tokens.
QUERY_LENS, SEQ_LENS = [1, 1, 20, 9], [300, 129, 400, 9]
ALGORITHMS = ("auto", "token", "union", "k2q")
ON_HOPPER = mosaic.mosaic_available()
# The cases' specs: each spec is a set of interpret-mode compiles of every path (a minute of
# CPU), so the cases share four: both layouts, every cache dtype, GQA groups 4 and 16.
# (cache, layout, heads, scale_mode)
BF16_NHD = ("auto", "NHD", (8, 2), "none")
F16_HND = ("float16", "HND", (8, 2), "none")
E4M3_HND = ("fp8_e4m3", "HND", (16, 1), "per_slot")
E5M2_HND = ("fp8_e5m2", "HND", (16, 1), "per_slot")


def _problem(rng, cache="auto", layout="NHD", heads=(8, 2), topk=16, scale_mode="none", **kw):
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=topk, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    kw.setdefault("num_tokens", 40)
    return random_problem(spec, QUERY_LENS, SEQ_LENS, rng, scale_mode=scale_mode,
                          query_dtype=matching_query_dtype(cache), scatter=True, **kw)


def _scales(problem):
    return [None if s is None else jnp.asarray(s) for s in (problem.k_scale, problem.v_scale)]


def _mixed_auto(problem, monkeypatch):
    """"auto" past its thresholds on 40 tokens, in one call: prefill tiles whose union is at
    most the middle of the tiles' union sizes go to the union kernel, the others to k2q, the
    decodes to the token kernel."""
    spec, md = problem.spec, interop.to_jax(problem.metadata)
    n = problem.query.shape[0]
    prefill = jnp.arange(n) >= md.num_decode_tokens
    plan = plan_union(jnp.asarray(problem.topk_indices), md.token_to_req[:n],
                      jnp.where(prefill, md.token_positions[:n], -1), md.block_table,
                      num_blocks=problem.kv_cache.shape[0], block_size=spec.block_size,
                      tile_tokens=tile_tokens(spec.num_queries_per_kv))
    sizes = np.asarray(plan.size).max(0)
    monkeypatch.setattr(dispatch, "UNION_MIN_TOKENS", 0)
    monkeypatch.setattr(dispatch, "K2Q_MIN_TOKENS", 0)
    monkeypatch.setattr(dispatch, "max_union", lambda *_: int(sizes.min() + sizes.max()) // 2)
    num_blocks = problem.kv_cache.shape[0]
    k_scale, v_scale = (check_scale(name, s, spec, num_blocks)
                        for name, s in (("k_scale", problem.k_scale), ("v_scale", problem.v_scale)))
    return jax.jit(lambda *a: dispatch.sparse_attention_pallas(
        spec, *a, num_decode_tokens=md.num_decode_tokens, prefill_algorithm="auto"))(
            jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md.token_to_req[:n], md.token_positions[:n],
            md.block_table, k_scale, v_scale)


def _every_path(problem, monkeypatch):
    """{label: output} of every implementation x prefill_algorithm that runs here: "pallas",
    "tpu" and "xla" everywhere, "mosaic" on a Hopper GPU (one split and several)."""
    md = interop.to_jax(problem.metadata)
    k_scale, v_scale = _scales(problem)
    args = (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), md)
    runnable = ("pallas", "tpu", "xla", *(("mosaic",) if ON_HOPPER else ()))
    outs = {}
    for impl in runnable:
        for algorithm in ALGORITHMS if impl in ("pallas", "mosaic") else ("auto",):
            outs[f"{impl} {algorithm}"] = jax_sparse.sparse_attention(
                *args, k_scale=k_scale, v_scale=v_scale, implementation=impl,
                prefill_algorithm=algorithm)
    for impl in runnable[::3]:  # pallas, mosaic: split-K with its merge, and without
        for splits in (1, 4):
            outs[f"{impl} token num_splits={splits}"] = jax_sparse.sparse_attention(
                *args, k_scale=k_scale, v_scale=v_scale, implementation=impl,
                prefill_algorithm="token", num_splits=splits)
    outs["pallas auto (union + k2q + token)"] = _mixed_auto(problem, monkeypatch)
    return outs


def _reference(problem):
    return interop.reference_attention(problem.spec, problem.query, problem.kv_cache,
                                       problem.topk_indices, problem.metadata, problem.k_scale,
                                       problem.v_scale)


def _compare(out, ref, label, leak=None):
    """None when out matches the reference row by row, else what differs. leak: [tokens,
    heads] bool rows that may be NaN where the reference is not (union tiles: README, "Bad
    input")."""
    out = np.asarray(out, np.float64)
    if out.shape != ref.shape:
        return f"{label}: shape {out.shape}, expected {ref.shape}"
    nan_ref, nan_out = np.isnan(ref).any(-1), np.isnan(out).any(-1)
    if leak is not None:
        if (nan_out & ~nan_ref & ~leak).any():
            return f"{label}: NaN rows past the tiles of the reference's NaN rows"
        ref = np.where(nan_out[..., None] & leak[..., None], np.nan, ref)
        nan_ref = nan_ref | (nan_out & leak)
    if (nan_ref != nan_out).any():
        rows = np.argwhere(nan_ref != nan_out)[:4].tolist()
        return (f"{label}: NaN rows differ at (token, head) {rows}: reference NaN "
                f"{nan_ref[tuple(np.array(rows).T)].tolist()}")
    fine = ~nan_ref
    if not np.isfinite(out[fine]).all():
        return f"{label}: Inf in rows the reference has finite"
    zero = fine & ~ref.any(-1)
    if out[zero].any():
        return f"{label}: {int(out[zero].any(-1).sum())} rows not zeros that attend nothing"
    denom = max(np.linalg.norm(ref[fine]), 1e-30)
    err = np.linalg.norm(out[fine] - ref[fine]) / denom
    return None if err < TOL else f"{label}: relative error {err:.3g} >= {TOL}"


def _check_every_path(problem, monkeypatch, label, *, expect_nan=True, tile_leak=False):
    """Every path against the reference. tile_leak: on the union tiles ("union", "auto"),
    rows of tokens within a tile of a NaN row (same KV head group) may be NaN too."""
    ref = _reference(problem)
    nan_rows = np.isnan(ref).any(-1)
    assert nan_rows.any() == expect_nan, f"{label}: weak case, reference NaN rows {nan_rows.sum()}"
    assert (~nan_rows & ref.any(-1)).any(), f"{label}: weak case, no finite nonzero row"
    leak = None
    if tile_leak:
        group = problem.spec.num_queries_per_kv
        leak = tile_neighbours(nan_rows, group, union_tile_tokens(group))
    failures = [msg for name, out in _every_path(problem, monkeypatch).items()
                if (msg := _compare(out, ref, f"{label}, {name}",
                                    leak if ("union" in name or "auto" in name) else None))]
    assert not failures, "\n".join(failures)


def _attended(problem):
    """[num_tokens, num_kv_heads] bool: the row attends at least one key (reference rule)."""
    md, bs = problem.metadata, problem.spec.block_size
    pos = np.asarray(md.token_positions, np.int64)
    valid = interop.metadata.valid_topk_mask(problem.topk_indices.astype(np.int64), pos, bs)
    table = md.block_table
    blocks = np.clip(problem.topk_indices, 0, table.shape[1] - 1)
    pages = table[np.asarray(md.token_to_req)[None, :, None], blocks]
    valid &= (pages >= 0) & (pages < problem.kv_cache.shape[0])
    return valid.any(-1).T


# --- R1: a NaN or Inf query row ----------------------------------------------------------------

@pytest.mark.parametrize("cache, layout, heads, scale_mode", [BF16_NHD, F16_HND, E4M3_HND],
                         ids=lambda v: str(v))
def test_nonfinite_query_rows(rng, monkeypatch, cache, layout, heads, scale_mode):
    """NaN, +Inf and -Inf in query rows: the rows that attend a key are NaN, those that attend
    nothing (padding tokens, empty rows) zeros, every other row unchanged."""
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, future_fraction=0.3,
                       empty_fraction=0.15)
    attended = np.repeat(_attended(problem), problem.spec.num_queries_per_kv, axis=1)
    q = problem.query.astype(np.float32)
    num_tokens, num_heads, dim = q.shape
    picks = rng.random((num_tokens, num_heads)) < 0.2
    picks[:, 0] |= ~attended[:, 0]  # garbage in rows that attend nothing too
    values = rng.choice([np.nan, np.inf, -np.inf], size=picks.shape)
    for (t, h) in np.argwhere(picks):
        q[t, h, rng.integers(0, dim, size=rng.integers(1, 4))] = values[t, h]
    problem.query = q.astype(problem.query.dtype)
    _check_every_path(problem, monkeypatch, f"non-finite query {cache} {layout} {scale_mode}")


# --- R1: a NaN in a cache slot some rows attend ------------------------------------------------

def _slot_view(problem):
    """The cache as float32 [num_blocks, 2, block_size, num_kv_heads, head_size] (a copy)."""
    cache = problem.kv_cache.astype(np.float32)
    return cache if problem.spec.kv_cache_layout == "NHD" else np.swapaxes(cache, 2, 3)


def _store_slots(problem, logical):
    if problem.spec.kv_cache_layout == "HND":
        logical = np.swapaxes(logical, 2, 3)
    problem.kv_cache = logical.astype(problem.kv_cache.dtype)


@pytest.mark.parametrize("kv, cache, layout, heads, scale_mode", [
    ("K", *F16_HND), ("V", *BF16_NHD), ("V", *E4M3_HND)], ids=lambda v: str(v))
def test_nan_in_attended_slots(rng, monkeypatch, kv, cache, layout, heads, scale_mode):
    """A NaN in a K or V slot makes the rows that attend it NaN. Tokens of a tile that share
    the page but stop before the slot (or did not choose its block) stay finite on every path
    for K; for V the union tiles may show it in those rows too (README, "Bad input"). The
    slots: each prefill token's own newest key for a few tokens, and random attended slots."""
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, future_fraction=0.3)
    poison_unused_slots(problem)  # slots no row attends hold NaN too: they never show
    md, bs = problem.metadata, problem.spec.block_size
    logical = _slot_view(problem)
    positions = np.asarray(md.token_positions)
    prefill = np.flatnonzero(np.arange(len(positions)) >= md.num_decode_tokens)
    prefill = prefill[positions[prefill] >= 0]
    for t in rng.choice(prefill, size=4, replace=False):
        pos, req = int(positions[t]), int(md.token_to_req[t])
        page = md.block_table[req, pos // bs]
        head = rng.integers(0, problem.spec.num_kv_heads)
        logical[page, 0 if kv == "K" else 1, pos % bs, head] = np.nan
    _store_slots(problem, logical)
    _check_every_path(problem, monkeypatch, f"NaN {kv} slots {cache} {layout}",
                      tile_leak=(kv == "V"))


# --- R2: a block listed twice in a row counts once ---------------------------------------------

def _with_repeats(problem, rng):
    """Each row's entries with a third of them replaced by copies of other entries of the
    row (valid blocks, sentinels and future blocks alike), anywhere in the row."""
    topk = problem.topk_indices.copy()
    k = topk.shape[-1]
    for g, t in np.ndindex(topk.shape[:2]):
        for c in rng.choice(k, size=k // 3, replace=False):
            topk[g, t, c] = topk[g, t, rng.integers(0, k)]
    return topk


@pytest.mark.parametrize("cache, layout, heads, scale_mode", [BF16_NHD, E4M3_HND],
                         ids=lambda v: str(v))
def test_repeated_entries_count_once(rng, monkeypatch, cache, layout, heads, scale_mode):
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, future_fraction=0.3)
    problem.topk_indices = _with_repeats(problem, rng)
    report = interop.validate_topk(problem.topk_indices, problem.metadata)
    assert report.duplicates, "weak case: no row repeats a valid entry"
    _check_every_path(problem, monkeypatch, f"repeats {cache} {layout} {heads}",
                      expect_nan=False)


def test_repeats_nan_and_poisoned_slots_together(rng, monkeypatch):
    """Every kind of garbage in one batch."""
    cache, layout, heads, scale_mode = E5M2_HND
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode, future_fraction=0.3,
                       empty_fraction=0.1)
    problem.topk_indices = _with_repeats(problem, rng)
    poison_unused_slots(problem)
    q = problem.query.astype(np.float32)
    q[rng.integers(0, q.shape[0], 6), rng.integers(0, q.shape[1], 6), 0] = np.nan
    problem.query = q.astype(problem.query.dtype)
    _check_every_path(problem, monkeypatch, "repeats + NaN query + poisoned slots")


# --- the shared pieces Mosaic GPU uses: its plan and its split merge ---------------------------

def test_mosaic_plan_drops_repeats(rng):
    """plan_pages (XLA, before the Mosaic GPU kernel) lists each repeated block once."""
    problem = _problem(rng, future_fraction=0.3)
    problem.topk_indices = _with_repeats(problem, rng)
    md = problem.metadata
    _, _, counts = mosaic.plan_pages(
        problem.spec, jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
        jnp.asarray(md.token_positions), jnp.asarray(md.block_table), problem.kv_cache.shape[0])
    bs = problem.spec.block_size
    expected = np.zeros(counts.shape, np.int64)
    for g, t in np.ndindex(counts.shape):
        pos, req = int(md.token_positions[t]), int(md.token_to_req[t])
        blocks = {int(b) for b in problem.topk_indices[g, t]
                  if 0 <= b <= pos // bs and b < md.block_table.shape[1]
                  and 0 <= md.block_table[req, b] < problem.kv_cache.shape[0]}
        expected[g, t] = len(blocks)
    assert np.array_equal(np.asarray(counts), expected), "valid distinct entries per row differ"


def test_merge_splits_nan_and_empty():
    """The split merge (token kernel, k2q, Mosaic GPU): splits that attended nothing drop out,
    a NaN partial or lse makes the row NaN, a row with no attended split is zeros."""
    out = jnp.asarray([[[1.0, 2.0]] * 4, [[3.0, 4.0], [0.0, 0.0], [np.nan, 0.0], [5.0, 6.0]]])
    lse = jnp.asarray([[0.0, -np.inf, 1.0, -np.inf], [0.0, -np.inf, 0.0, np.nan]])
    out = out.at[0, 1].set(0.0).at[0, 3].set(0.0)  # empty splits hold zeros
    merged = np.asarray(_merge_splits(out, lse))
    assert np.allclose(merged[0], [2.0, 3.0]), merged[0]   # equal weights
    assert not merged[1].any(), merged[1]                  # no split attended
    assert np.isnan(merged[2, 0]), merged[2]               # NaN partial
    assert np.isnan(merged[3]).all(), merged[3]            # NaN lse
    # Mosaic GPU passes "attended" from its plan: an attended row whose splits all have lse
    # -inf (every score -inf: an Inf query) is NaN, not zeros.
    attended = jnp.asarray([True, True, True, True])
    nan_out = jnp.full((1, 4, 2), jnp.nan)
    merged = np.asarray(_merge_splits(nan_out, jnp.full((1, 4), -jnp.inf), attended))
    assert np.isnan(merged).all(), merged


def test_normalize_rules():
    """attended rows divide by l whatever it holds; rows that attend nothing are zeros."""
    acc = jnp.asarray([[2.0, 4.0], [0.0, 0.0], [0.0, 0.0], [np.nan, 1.0]])
    m = jnp.asarray([1.0, -1e30, -1e30, 0.0])
    l = jnp.asarray([2.0, 0.0, 0.0, np.nan])
    out, lse = normalize(acc, m, l, jnp.asarray([True, False, True, True]))
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.array_equal(out[0], [1.0, 2.0]) and lse[0] == 2.0
    assert np.array_equal(out[1], [0.0, 0.0]) and lse[1] == -np.inf
    assert np.isnan(out[2]).all() and np.isnan(lse[2])  # attended, l = 0: every score -inf
    assert np.isnan(out[3]).all() and np.isnan(lse[3])


# --- R3 / R8: write_kv's slots ---------------------------------------------------------------

def _write_args(rng, layout="NHD", cache="auto"):
    problem = _problem(rng, cache, layout, future_fraction=0.0)
    md = problem.metadata
    return (problem, jnp.asarray(problem.key), jnp.asarray(problem.value),
            np.asarray(md.slot_mapping).copy())


def _logical(cache, spec):
    """[num_blocks, 2, block_size, num_kv_heads, D] float32 NumPy copy of a physical cache."""
    cache = np.array(jnp.asarray(cache, jnp.float32))
    return cache if spec.kv_cache_layout == "NHD" else np.swapaxes(cache, 2, 3)


def _expected_after_write(problem, slots):
    """The cache after writing problem.key / value at `slots` per the contract (bf16 cache)."""
    spec = problem.spec
    expected = _logical(problem.kv_cache, spec)
    num_slots = expected.shape[0] * spec.block_size
    for t, slot in enumerate(slots[:problem.key.shape[0]]):
        if 0 <= slot < num_slots:
            page, offset = divmod(int(slot), spec.block_size)
            expected[page, 0, offset] = problem.key[t].astype(np.float32)
            expected[page, 1, offset] = problem.value[t].astype(np.float32)
    return expected


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("where", ["numpy", "jax-cpu", "device-checks"])
def test_write_kv_slot_past_cache_is_an_error_before_donation(rng, layout, where):
    """NumPy slots and JAX slots on the CPU are checked on every call (free); slots on the
    default device (a GPU's copy to the host) in the check mode."""
    problem, key, value, slots = _write_args(rng, layout)
    num_slots = problem.kv_cache.shape[0] * problem.spec.block_size
    slots[5], slots[9] = num_slots, num_slots + 1000
    checks = where == "device-checks"
    cpu = jax.devices("cpu")[0]
    if where == "jax-cpu":
        cache, key, value, bad = (jax.device_put(x, cpu) for x in (
            problem.kv_cache, key, value, slots))
    else:
        cache = jnp.asarray(problem.kv_cache)
        bad = slots if where == "numpy" else jnp.asarray(slots)
    with pytest.raises(ValueError, match=rf"slot_mapping\[5\] = {num_slots} is past the cache: "
                                         rf"slots must be < num_blocks \* block_size = "
                                         rf"{num_slots} \(2 tokens are"):
        jax_sparse.write_kv(cache, key, value, bad, problem.spec, checks=checks)
    assert not cache.is_deleted(), "a failed write_kv consumed the donated cache"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_kv_under_jit_skips_negative_and_never_writes_past_the_cache(rng, layout):
    """Traced slots (no check): negative ones and those past the cache write nothing; the
    others land; slot_mapping longer than the tokens: the extra entries are ignored."""
    problem, key, value, slots = _write_args(rng, layout)
    num_slots = problem.kv_cache.shape[0] * problem.spec.block_size
    slots[3], slots[4], slots[7] = -5, num_slots, 2**31 - 1
    padded = np.concatenate([slots, [0, num_slots + 7, 1]])  # extra entries: garbage
    write = jax.jit(jax_sparse.write_kv, static_argnums=4)
    out = write(jnp.asarray(problem.kv_cache), key, value, jnp.asarray(padded), problem.spec)
    expected = _expected_after_write(problem, slots)
    assert np.array_equal(_logical(out, problem.spec), expected), f"{layout}: stray writes"


@pytest.mark.parametrize("how", ["env", "keyword"])
def test_write_kv_check_mode_raises_under_jit(rng, monkeypatch, how):
    problem, key, value, slots = _write_args(rng)
    num_slots = problem.kv_cache.shape[0] * problem.spec.block_size
    slots[6] = num_slots + 3
    kw = {}
    if how == "env":
        monkeypatch.setenv("M3_SPARSE_CHECKS", "1")
    else:
        kw["checks"] = True

    @jax.jit
    def step(cache, key, value, slots):
        return jax_sparse.write_kv(cache, key, value, slots, problem.spec, **kw)

    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=rf"slot_mapping\[6\] = {num_slots + 3} is past the cache"):
        jax.block_until_ready(step(jnp.asarray(problem.kv_cache), key, value,
                                   jnp.asarray(slots)))
    # Good slots pass the check mode.
    slots[6] = -1
    out = step(jnp.asarray(problem.kv_cache), key, value, jnp.asarray(slots))
    assert np.array_equal(_logical(out, problem.spec), _expected_after_write(problem, slots))


def test_write_kv_check_mode_off_under_jit(rng, monkeypatch):
    """Without the check mode, traced slots are not checked (nothing raises, nothing lands)."""
    monkeypatch.delenv("M3_SPARSE_CHECKS", raising=False)
    problem, key, value, slots = _write_args(rng)
    slots[6] = problem.kv_cache.shape[0] * problem.spec.block_size
    out = jax.jit(lambda *a: jax_sparse.write_kv(*a, problem.spec))(
        jnp.asarray(problem.kv_cache), key, value, jnp.asarray(slots))
    assert np.array_equal(_logical(out, problem.spec), _expected_after_write(problem, slots))


def test_slot_mapping_length(rng):
    """R8: longer than the tokens is accepted (the extra entries are ignored), shorter is a
    ValueError; the same for the metadata of sparse_attention."""
    problem, key, value, slots = _write_args(rng)
    n = key.shape[0]
    longer = np.concatenate([slots, np.full(5, 10**9)])
    out = jax_sparse.write_kv(jnp.asarray(problem.kv_cache), key, value, longer, problem.spec)
    assert np.array_equal(_logical(out, problem.spec), _expected_after_write(problem, slots))
    cache = jnp.asarray(problem.kv_cache)
    with pytest.raises(ValueError, match=rf"slot_mapping has {n - 1} entries: expected {n} or "
                                         r"more"):
        jax_sparse.write_kv(cache, key, value, slots[:-1], problem.spec)
    assert not cache.is_deleted()
    # sparse_attention: metadata of more tokens than the query rows is fine.
    md = interop.to_jax(problem.metadata)
    out = jax_sparse.sparse_attention(problem.spec, jnp.asarray(problem.query[:n - 4]),
                                      cache, jnp.asarray(problem.topk_indices), md,
                                      implementation="xla")
    assert out.shape[0] == n - 4


def test_sharded_write_kv_slot_past_the_ranks_pages(rng):
    """sharded_write_kv: rank-local slots past the rank's own pages are a ValueError before
    donation (host slots), and never written under jit."""
    from jax.sharding import Mesh
    devices = np.array(jax.devices("cpu")[:2]).reshape(2, 1)
    mesh = Mesh(devices, ("dp", "tp"))
    problem, key, value, slots = _write_args(rng)
    spec = problem.spec
    num_blocks = problem.kv_cache.shape[0] // 2 * 2
    cache = jnp.asarray(problem.kv_cache[:num_blocks])
    local_slots = num_blocks // 2 * spec.block_size
    slots = np.where(slots < local_slots, slots, -1)
    slots[4] = local_slots  # inside the global cache, past rank 0's pages
    with pytest.raises(ValueError, match=rf"slot_mapping\[4\] = {local_slots} is past the "
                                         r"cache"):
        jax_sparse.sharded_write_kv(mesh, cache, key, value, slots, spec)
    assert not cache.is_deleted()


# --- R4: a JAX write into a cache PyTorch owns -------------------------------------------------

def test_write_kv_into_a_torch_owned_cache_is_an_error(rng):
    torch = pytest.importorskip("torch")
    problem, _, _, slots = _write_args(rng, "HND")
    key, value = problem.key, problem.value  # host arrays: they follow the (CPU) cache
    spec = problem.spec
    t_cache = interop.allocate_torch_kv_cache(spec, problem.kv_cache.shape[0], torch.bfloat16)
    t_cache.copy_(interop.kv_cache_to_torch(problem.kv_cache, spec, copy=True))
    j_cache = interop.kv_cache_to_jax(t_cache, spec)
    with pytest.raises(ValueError, match=r"PyTorch-owned cache.*torch_sparse\.write_kv.*"
                                         r"jnp\.array\(kv_cache, copy=True\)"):
        jax_sparse.write_kv(j_cache, key, value, slots, spec)
    assert not j_cache.is_deleted(), "the imported cache was consumed"
    owned = jnp.array(j_cache, copy=True)  # the named fix works
    jax_sparse.write_kv(owned, key, value, slots, spec)


# --- R7: dtype mistakes are TypeError, shape and value mistakes ValueError; PyTorch input ----

def test_float32_query_and_key_are_the_same_error(rng):
    problem, key, value, slots = _write_args(rng)
    md = interop.to_jax(problem.metadata)
    cache = jnp.asarray(problem.kv_cache)
    with pytest.raises(TypeError, match=r"query dtype float32 is not supported"):
        jax_sparse.sparse_attention(problem.spec, jnp.asarray(problem.query, jnp.float32),
                                    cache, jnp.asarray(problem.topk_indices), md)
    with pytest.raises(TypeError, match=r"key dtype float32 is not supported"):
        jax_sparse.write_kv(cache, key.astype(jnp.float32), value.astype(jnp.float32), slots,
                            problem.spec)
    with pytest.raises(TypeError, match=r"value dtype float16 must match key dtype bfloat16"):
        jax_sparse.write_kv(cache, key, value.astype(jnp.float16), slots, problem.spec)
    with pytest.raises(ValueError, match=r"value shape \(\d+, 2, 128\) must match key shape"):
        jax_sparse.write_kv(cache, key, value[:-1], slots, problem.spec)
    with pytest.raises(TypeError, match=r"slot_mapping must hold integers, got dtype float32"):
        jax_sparse.write_kv(cache, key, value, slots.astype(np.float32), problem.spec)
    with pytest.raises(TypeError, match=r"kv_cache dtype float16 does not match the spec"):
        jax_sparse.write_kv(cache.astype(jnp.float16), key, value, slots, problem.spec)
    with pytest.raises(TypeError, match=r"metadata must be an interop.SparseMetadata"):
        jax_sparse.sparse_attention(problem.spec, jnp.asarray(problem.query), cache,
                                    jnp.asarray(problem.topk_indices), {"seq_lens": 1})
    assert not cache.is_deleted()


def test_torch_input_names_the_bridge(rng):
    torch = pytest.importorskip("torch")
    problem, key, value, slots = _write_args(rng)
    spec = problem.spec
    md = interop.to_jax(problem.metadata)
    q, cache = jnp.asarray(problem.query), jnp.asarray(problem.kv_cache)
    topk = jnp.asarray(problem.topk_indices)
    t_q = interop.to_torch(problem.query)
    t_cache = interop.kv_cache_to_torch(problem.kv_cache, spec)
    attend = functools.partial(jax_sparse.sparse_attention, spec)
    cases = [
        (lambda: attend(t_q, cache, topk, md), r"query is a PyTorch tensor.*interop\.to_jax"),
        (lambda: attend(q, t_cache, topk, md),
         r"kv_cache is a PyTorch tensor.*interop\.kv_cache_to_jax\(kv_cache, spec\)"),
        (lambda: attend(q, cache, torch.as_tensor(problem.topk_indices), md),
         r"topk_indices is a PyTorch tensor.*interop\.to_jax\(topk_indices\)"),
        (lambda: attend(q, cache, topk, interop.to_torch(problem.metadata)),
         r"metadata is the PyTorch flavour of SparseMetadata.*interop\.to_jax\(metadata\)"),
        (lambda: jax_sparse.write_kv(t_cache, key, value, slots, spec),
         r"kv_cache is a PyTorch tensor.*interop\.kv_cache_to_jax"),
        (lambda: jax_sparse.write_kv(cache, interop.to_torch(problem.key), value, slots, spec),
         r"key is a PyTorch tensor.*interop\.to_jax\(key\)"),
        (lambda: jax_sparse.write_kv(cache, key, value, torch.as_tensor(slots), spec),
         r"slot_mapping is a PyTorch tensor.*interop\.to_jax\(slot_mapping\)"),
        (lambda: jax_sparse.minimax_m3_sparse_attn_decode(
            t_q, cache, topk, md.block_table, md.seq_lens, 2, None, 1),
         r"q is a PyTorch tensor.*interop\.to_jax\(q\)"),
        (lambda: jax_sparse.minimax_m3_sparse_attn(
            q, cache, topk, interop.to_torch(problem.metadata.block_table), md.seq_lens,
            md.seq_lens, md.seq_lens, 1, 2, None), r"block_table is a PyTorch tensor"),
    ]
    for call, match in cases:
        with pytest.raises(TypeError, match=match):
            call()
    assert not cache.is_deleted()
