"""Garbage in, the same answer out (contract section 5, issue 18) on every torch_sparse path.

Every attention case runs every path: the Triton kernels (interpreted on a CPU) with each
prefill_algorithm ("token", "union", "k2q", and "auto" with its thresholds lowered so it plans
and splits the prefill between union and k2q), the seed's split-K decode call, and the eager
PyTorch path; each must match interop.reference_attention (float64), NaN rows included.
Then write_kv's slots, the interpreter / impl rules, type errors naming the bridges, the
metadata builder's page check, and an in-place write into a cache that JAX owns.
"""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import poison_unused_slots, random_problem, relative_error
from interop.tiling import union_tile_tokens

from .helpers import tile_neighbours

torch = pytest.importorskip("torch")
import torch_sparse  # noqa: E402
from torch_sparse import attention, dispatch, ops  # noqa: E402
from torch_sparse import eager  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-2  # as tests/test_torch_sparse.py: 16-bit dot operands
# (impl, prefill_algorithm): every path of sparse_attention.
PATHS = [("triton", "token"), ("triton", "union"), ("triton", "k2q"), ("triton", "auto"),
         ("eager", "auto")]
# Two decodes (split-K), a prefill with context crossing position 128, one from position 0,
# two padding tokens.
QUERY_LENS, SEQ_LENS = [1, 1, 20, 13], [300, 129, 140, 13]
NUM_TOKENS = sum(QUERY_LENS) + 2


def _spec(cache="auto", layout="NHD", topk=4, heads=(8, 2)):
    return interop.SparseAttentionSpec(heads[0], heads[1], head_size=128, block_size=128,
                                       topk_blocks=topk, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)


def _problem(rng, spec=None, scale_mode="none", **selection):
    spec = spec or _spec()
    return random_problem(spec, QUERY_LENS, SEQ_LENS, rng, scale_mode=scale_mode,
                          num_tokens=NUM_TOKENS, **selection)


def _tensors(problem):
    def scale(s):
        return torch.from_numpy(s).to(DEVICE) if isinstance(s, np.ndarray) else s
    return dict(query=interop.to_torch(problem.query, DEVICE),
                kv_cache=interop.kv_cache_to_torch(problem.kv_cache, problem.spec).to(DEVICE),
                topk=interop.to_torch(problem.topk_indices, DEVICE),
                metadata=interop.to_torch(problem.metadata, DEVICE),
                k_scale=scale(problem.k_scale), v_scale=scale(problem.v_scale))


def _every_path(problem, monkeypatch, paths=PATHS):
    """{path name: float64 output} of every path on the problem (outputs start as NaN, so an
    unwritten row fails)."""
    t = _tensors(problem)
    outs = {}
    # "auto" plans every prefill and gives the small-union tiles to the union kernel, the rest
    # to k2q (the thresholds are sized for the H100; lowered here so the small batch uses both).
    monkeypatch.setattr(dispatch, "PREFILL_RULE", dataclasses.replace(
        dispatch.PREFILL_RULE, union_min_tokens=0, union_share=0.05, fp8_union_share=0.05,
        k2q_min_tokens=0))
    for impl, algorithm in paths:
        out = torch.full_like(t["query"], float("nan"))
        torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                      t["metadata"], out, k_scale=t["k_scale"],
                                      v_scale=t["v_scale"], implementation=impl,
                                      prefill_algorithm=algorithm)
        outs[f"{impl}/{algorithm}"] = out.double().cpu().numpy()
    md = t["metadata"]
    nd = md.num_decode_tokens
    for impl in ("triton", "eager"):
        out = torch.full_like(t["query"][:nd], float("nan"))
        torch_sparse.minimax_m3_sparse_attn_decode(
            t["query"][:nd], t["kv_cache"], t["topk"][:, :nd], md.decode.block_table,
            md.decode.seq_lens, problem.spec.num_kv_heads, problem.spec.scale, out,
            md.decode_query_len, t["k_scale"], t["v_scale"], implementation=impl)
        outs[f"{impl}/seed decode"] = out.double().cpu().numpy()
    return outs


def _reference(problem):
    return interop.reference_attention(problem.spec, problem.query, problem.kv_cache,
                                       problem.topk_indices, problem.metadata, problem.k_scale,
                                       problem.v_scale)


def _assert_every_path_matches(problem, monkeypatch, case, ref=None, paths=PATHS,
                               tile_leak=False):
    """Each path: NaN exactly where the reference has NaN, the finite rows within TOL. Fails
    listing every path that differs. tile_leak: the union tiles ("union", "auto") may also
    give NaN to rows near a NaN row (`tile_neighbours`), never elsewhere."""
    ref = _reference(problem) if ref is None else ref
    failures = []
    group = problem.spec.num_queries_per_kv
    for path, out in _every_path(problem, monkeypatch, paths).items():
        r = ref[:out.shape[0]]
        bad_out, bad_ref = ~np.isfinite(out), ~np.isfinite(r)
        if tile_leak and path.endswith(("/union", "/auto")):
            rows_out, rows_ref = bad_out.any(-1), bad_ref.any(-1)
            allowed = rows_ref | tile_neighbours(rows_ref, group, union_tile_tokens(group))
            if (rows_ref & ~rows_out).any() or (rows_out & ~allowed).any():
                failures.append(f"{path}: NaN rows {np.argwhere(rows_out)[:6].tolist()} are "
                                f"not the reference's and their tile neighbours")
                continue
            bad_ref = bad_ref | bad_out
        if (bad_out != bad_ref).any():
            rows = sorted({tuple(int(i) for i in x)
                           for x in np.argwhere((bad_out != bad_ref).any(-1))})
            failures.append(f"{path}: non-finite (token, head) rows differ at {rows[:6]} "
                            f"(path: {int(bad_out.any(-1).sum())}, reference: "
                            f"{int(bad_ref.any(-1).sum())})")
            continue
        err = relative_error(np.where(bad_ref, 0.0, out), np.where(bad_ref, 0.0, r))
        if not err < TOL:
            failures.append(f"{path}: relative error {err:.3e} on the finite rows")
    assert not failures, f"{case}: " + "; ".join(failures)
    return ref


# --- R1: non-finite queries, NaN in the cache -----------------------------------------------

def test_nonfinite_query_rows(rng, monkeypatch):
    """NaN / +Inf / -Inf in single query elements (decode and prefill rows, in the middle of a
    union tile): those rows are NaN, every other row unchanged; a NaN query row that attends
    nothing (an empty top-k row, a padding token) stays zeros. One infinite query row attends a
    single key with a -inf score: its softmax sum is 0, not NaN, and it must still be NaN."""
    problem = _problem(rng, scatter=True, future_fraction=0.3)
    q = problem.query.astype(np.float32)
    nd = 2
    empty = nd + 7                    # a prefill token whose KV group 0 selects nothing
    problem.topk_indices[0, empty] = -1
    hits = [(0, 1, np.nan), (1, 6, np.inf), (nd + 3, 0, -np.inf), (nd + 10, 5, np.nan),
            (nd + 25, 2, np.inf), (empty, 1, np.nan), (NUM_TOKENS - 1, 4, np.nan)]
    for token, head, value in hits:
        q[token, head, int(rng.integers(128))] = value
    # Request 3 starts at position 0: its first token attends key 0 alone. An infinity of the
    # sign opposite to that key's element makes the one score -inf.
    first = int(problem.metadata.query_start_loc[3])
    page = int(problem.metadata.block_table[3, 0])
    key0 = interop.kv_cache_to_torch(problem.kv_cache, problem.spec)[page, 0, 0, 1].float()
    q[first, 6] = 0.0
    q[first, 6, 3] = -np.inf if key0[3] > 0 else np.inf
    problem.query = q.astype(problem.query.dtype)
    ref = _assert_every_path_matches(problem, monkeypatch, "non-finite query rows")
    nan_rows = np.isnan(ref).any(-1)
    assert nan_rows.sum() == 6 and nan_rows[first, 6] and not nan_rows[empty, 1] \
        and not nan_rows[-1, 4], "the reference's NaN rows are not the ones the test meant"
    assert not ref[empty, 1].any() and not ref[-1].any()


# FP8: e5m2, whose NaN Triton's interpreter converts to NaN (it turns e4m3fn's NaN into 480;
# the GPU's conversion keeps it NaN).
@pytest.mark.parametrize("cache,layout,scale_mode", [("auto", "NHD", "none"),
                                                     ("fp8_e5m2", "HND", "per_slot")])
def test_nan_in_the_cache(rng, monkeypatch, cache, layout, scale_mode):
    """NaN in every slot no row may attend (past each request's end, spare pages), and one NaN
    K and one NaN V element in slots a few later tokens of a prefill attend: exactly the rows
    that attend those slots are NaN; on the union tiles, so may the rows of that tile (they
    load the slot for a later token): README, "Bad input"."""
    spec = _spec(cache, layout)
    problem = _problem(rng, spec, scale_mode=scale_mode, rho=0.87)
    poison_unused_slots(problem)
    md = problem.metadata
    cache_np = problem.kv_cache.astype(np.float32)
    # Request 3 (a prefill from position 0, tokens 22..34): K NaN at position 6, V NaN at 9.
    page = int(md.block_table[3, 0])
    for kv, position in ((0, 6), (1, 9)):
        index = ((page, kv, position, 1, 5) if layout == "NHD" else (page, kv, 1, position, 5))
        cache_np[index] = np.nan
    problem.kv_cache = cache_np.astype(problem.kv_cache.dtype)
    ref = _assert_every_path_matches(problem, monkeypatch, f"NaN in the cache {cache}/{layout}",
                                     tile_leak=True)
    nan_rows = np.isnan(ref).any(-1)
    first = int(md.query_start_loc[3])
    assert nan_rows[first + 6:first + 13, 4:].all() and not nan_rows[:first + 6].any(), \
        "the reference's NaN rows are not the ones the test meant"


# --- R2: repeated entries --------------------------------------------------------------------

def _repeat_entries(rng, topk, tokens, copies):
    """Copy valid entries of each row over `copies` random columns; every third row also gets
    its first entry in its last column (another split-K chunk)."""
    for g in range(topk.shape[0]):
        for t in range(tokens):
            row = topk[g, t]
            chosen = row[row >= 0]
            if chosen.size == 0:
                continue
            k = rng.integers(row.size, size=copies)
            row[k] = rng.choice(chosen, size=copies)
            if t % 3 == 0:
                row[-1] = row[0] = chosen[0]


def test_repeated_entries_count_once(rng, monkeypatch):
    """Valid entries repeated in a row (next to each other, apart, across the decode's split-K
    chunks, three times) count once on every path."""
    problem = _problem(rng, scatter=True)
    _repeat_entries(rng, problem.topk_indices, NUM_TOKENS - 2, 2)
    report = interop.validate_topk(problem.topk_indices, problem.metadata)
    assert len(report.duplicates) > NUM_TOKENS, "the test must repeat entries in most rows"
    _assert_every_path_matches(problem, monkeypatch, "repeated entries")


def test_repeated_entries_in_wide_rows(rng, monkeypatch):
    """Rows of 72 entries, wider than the token kernel's 64-bit first-occurrence mask (its
    other rule: a compare with every earlier entry). The token kernel's paths and the eager one
    only: the union and k2q rules do not depend on the width, and the interpreter takes
    minutes over their 72-column loops."""
    spec = _spec(topk=72, heads=(4, 1))
    problem = random_problem(spec, [1, 2], [300, 260], rng, num_tokens=4, scatter=True)
    _repeat_entries(rng, problem.topk_indices, 3, 12)
    report = interop.validate_topk(problem.topk_indices, problem.metadata)
    assert len(report.duplicates) == 3, "the test must repeat entries in every row"
    _assert_every_path_matches(problem, monkeypatch, "repeated entries, 72 wide",
                               paths=[("triton", "token"), ("eager", "auto")])


# --- R3 / R8: write_kv slots ------------------------------------------------------------------

def _write_args(rng, spec):
    problem = random_problem(spec, [1, 3, 9], [129, 3, 300], rng, num_tokens=15)
    t = _tensors(problem)
    return (t["kv_cache"], interop.to_torch(problem.key, DEVICE),
            interop.to_torch(problem.value, DEVICE), t["metadata"].slot_mapping.clone())


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_write_kv_slot_past_the_cache_raises_before_writing(rng, impl):
    spec = _spec(layout="HND")
    kv_cache, key, value, slots = _write_args(rng, spec)
    num_slots = kv_cache.shape[0] * kv_cache.shape[2]
    slots[4] = num_slots + 7
    slots[9] = num_slots
    before = kv_cache.clone()
    with pytest.raises(ValueError, match=rf"slot_mapping\[4\] = {num_slots + 7}.*token 4"):
        torch_sparse.write_kv(kv_cache, key, value, slots, spec, implementation=impl)
    assert torch.equal(kv_cache, before), f"{impl}: a failed write_kv changed the cache"


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_write_kv_padding_and_slot_mapping_length(rng, impl):
    """Negative slots (any negative value) are skipped; entries past num_tokens are ignored,
    whatever they hold (vLLM pads slot_mapping); a shorter slot_mapping is a ValueError."""
    spec = _spec()
    kv_cache, key, value, slots = _write_args(rng, spec)
    slots[[1, 5]] = torch.tensor([-1, -(2 ** 40)], dtype=slots.dtype)
    padded = torch.cat([slots, torch.tensor([-5, 2 ** 40], dtype=slots.dtype, device=DEVICE)])
    expected = kv_cache.clone()
    block_size = kv_cache.shape[2]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 0, slot % block_size] = key[t]
            expected[slot // block_size, 1, slot % block_size] = value[t]
    torch_sparse.write_kv(kv_cache, key, value, padded, spec, implementation=impl)
    assert torch.equal(kv_cache, expected), f"{impl}: padding or extra slots were written"
    with pytest.raises(ValueError, match="slot_mapping has 14 entries"):
        torch_sparse.write_kv(kv_cache, key, value, slots[:14], spec, implementation=impl)


@pytest.mark.parametrize("writer", ["triton kernel", "eager"])
def test_write_kv_never_writes_past_the_cache(rng, writer):
    """Without the front end's check (a GPU outside check mode), a slot past the cache writes
    nothing: the cache sits between guard pages that must stay untouched."""
    spec = _spec()
    kv_cache, key, value, slots = _write_args(rng, spec)
    num_blocks, _, block_size = kv_cache.shape[:3]
    guarded = torch.full((num_blocks + 2,) + tuple(kv_cache.shape[1:]), 7.0,
                         dtype=kv_cache.dtype, device=DEVICE)
    guarded[1:-1] = kv_cache
    slots[3] = num_blocks * block_size          # the first slot of the guard page above
    slots[6] = num_blocks * block_size + 200
    slots[8] = -block_size                      # a slot of the guard page below, if followed
    inside = guarded[1:-1]
    if writer == "eager":
        eager.write_kv_eager(inside, key, value, slots)
    else:
        from torch_sparse import cache
        cache.launch_write_kv(inside, key, value, slots)
    assert (guarded[0] == 7).all() and (guarded[-1] == 7).all(), f"{writer} wrote past the cache"
    t = 0
    slot = int(slots[t])
    assert torch.equal(inside[slot // block_size, 0, slot % block_size], key[t]), writer


def test_check_mode_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv(ops.CHECKS_ENV, raising=False)
    assert not ops.checks_enabled()
    monkeypatch.setenv(ops.CHECKS_ENV, "1")
    assert ops.checks_enabled()
    # Off the CPU the check runs in check mode only (a meta tensor cannot be read: the check
    # is attempted exactly when check mode is on).
    slots = torch.zeros(4, dtype=torch.int64, device="meta")
    with pytest.raises(Exception):
        ops.check_slots(slots, 128)
    monkeypatch.setenv(ops.CHECKS_ENV, "0")
    ops.check_slots(slots, 128)


# --- R5: which path runs ----------------------------------------------------------------------

def test_interpreted_flag_and_impl_without_a_gpu(rng, monkeypatch):
    assert isinstance(torch_sparse.INTERPRETED, bool)
    assert torch_sparse.INTERPRETED == attention.INTERPRETED
    if DEVICE == "cuda":
        return
    assert torch_sparse.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 on a CPU"
    assert torch_sparse.default_implementation("cpu") == "triton"
    monkeypatch.setattr(ops, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET
    assert torch_sparse.default_implementation("cpu") == "eager"
    problem = _problem(rng)
    t = _tensors(problem)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before importing torch_sparse.*"
                                         "implementation='eager'"):
        torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                      t["metadata"], implementation="triton")


def test_deprecated_names(rng):
    """The old vocabulary still works, with a DeprecationWarning: impl= (now implementation=),
    the implementation name "reference" (now "eager"), IMPLS and default_impl()."""
    problem = _problem(rng)
    t = _tensors(problem)
    args = (problem.spec, t["query"], t["kv_cache"], t["topk"], t["metadata"])
    expected = torch_sparse.sparse_attention(*args, implementation="eager")
    with pytest.warns(DeprecationWarning, match="'eager'"):
        out = torch_sparse.sparse_attention(*args, implementation="reference")
    assert torch.equal(out, expected)
    with pytest.warns(DeprecationWarning, match="implementation="):
        out = torch_sparse.sparse_attention(*args, impl="eager")
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        torch_sparse.sparse_attention(*args, implementation="triton", impl="eager")
    with pytest.warns(DeprecationWarning, match="IMPLEMENTATIONS"):
        assert torch_sparse.IMPLS == torch_sparse.IMPLEMENTATIONS == ("triton", "eager")
    with pytest.warns(DeprecationWarning, match="default_implementation"):
        assert torch_sparse.default_impl("cpu") == torch_sparse.default_implementation("cpu")


# --- R7: type mistakes and the other framework's arrays ---------------------------------------

def test_numpy_inputs_name_the_bridge(rng):
    problem = _problem(rng)
    t = _tensors(problem)
    spec = problem.spec
    args = dict(query=t["query"], kv_cache=t["kv_cache"], topk_indices=t["topk"],
                metadata=t["metadata"])
    for name, value, bridge in (("query", problem.query, "interop.to_torch"),
                                ("kv_cache", problem.kv_cache, "interop.kv_cache_to_torch"),
                                ("topk_indices", problem.topk_indices, "interop.to_torch"),
                                ("metadata", problem.metadata, "interop.to_torch")):
        with pytest.raises(TypeError, match=bridge):
            torch_sparse.sparse_attention(spec, **{**args, name: value})
    with pytest.raises(TypeError, match="spec"):
        torch_sparse.sparse_attention(None, **args)
    with pytest.raises(TypeError, match="num_kv_heads"):
        torch_sparse.minimax_m3_sparse_attn_decode(
            t["query"][:2], t["kv_cache"], t["topk"][:, :2], t["metadata"].block_table[:2],
            t["metadata"].seq_lens[:2], "2", 0.1, torch.empty_like(t["query"][:2]), 1)
    with pytest.raises(TypeError, match="decode_query_len"):
        torch_sparse.minimax_m3_sparse_attn_decode(
            t["query"][:2], t["kv_cache"], t["topk"][:, :2], t["metadata"].block_table[:2],
            t["metadata"].seq_lens[:2], 2, 0.1, torch.empty_like(t["query"][:2]), 1.0)


def test_jax_inputs_name_the_bridge(rng):
    jax = pytest.importorskip("jax")
    problem = _problem(rng)
    t = _tensors(problem)
    spec = problem.spec
    args = dict(query=t["query"], kv_cache=t["kv_cache"], topk_indices=t["topk"],
                metadata=t["metadata"])
    jax_md = interop.to_jax(problem.metadata)
    for name, value, bridge in (
            ("query", jax.numpy.asarray(problem.query), r"JAX array.*interop\.to_torch"),
            ("kv_cache", jax.numpy.asarray(problem.kv_cache),
             r"JAX array.*interop\.kv_cache_to_torch"),
            ("topk_indices", jax.numpy.asarray(problem.topk_indices),
             r"JAX array.*interop\.to_torch"),
            ("metadata", jax_md, r"JAX arrays.*interop\.to_torch")):
        with pytest.raises(TypeError, match=bridge):
            torch_sparse.sparse_attention(spec, **{**args, name: value})
    key = interop.to_torch(problem.key, DEVICE)
    with pytest.raises(TypeError, match=r"interop\.kv_cache_to_torch"):
        torch_sparse.write_kv(jax.numpy.asarray(problem.kv_cache), key, key,
                              t["metadata"].slot_mapping, spec)
    with pytest.raises(TypeError, match=r"interop\.to_torch"):
        torch_sparse.write_kv(t["kv_cache"], jax.numpy.asarray(problem.key), key,
                              t["metadata"].slot_mapping, spec)
    impl = torch_sparse.MiniMaxM3SparseImpl(8, 128, spec.scale, 2, topk_blocks=4)
    query = t["query"].reshape(NUM_TOKENS, -1)
    with pytest.raises(TypeError, match=r"JAX arrays.*interop\.to_torch"):
        impl.forward(None, query, t["kv_cache"], t["topk"], jax_md, torch.empty_like(query))


# --- R6: the builder checks pages -------------------------------------------------------------

def test_builder_checks_pages_against_the_cache(rng):
    spec = _spec()
    problem = _problem(rng)
    md = problem.metadata
    num_blocks = problem.kv_cache.shape[0]
    table = md.block_table.copy()
    table[2, 1] = num_blocks  # a page request 2 uses, one past the cache
    builder = torch_sparse.MiniMaxM3SparseMetadataBuilder(spec, DEVICE, num_blocks=num_blocks)
    with pytest.raises(ValueError, match=r"block_table\[2, 1\]"):
        builder.build(QUERY_LENS, SEQ_LENS, table)
    ok = builder.build(QUERY_LENS, SEQ_LENS, md.block_table, num_tokens=NUM_TOKENS)
    assert torch.equal(ok.token_positions.cpu(), torch.from_numpy(md.token_positions))
    with pytest.raises(ValueError, match=r"block_table\[2, 1\]"):
        torch_sparse.MiniMaxM3SparseMetadataBuilder(spec, DEVICE).build(
            QUERY_LENS, SEQ_LENS, table, num_blocks=num_blocks)


# --- R4: a torch write into a cache JAX owns --------------------------------------------------

@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_into_a_cache_jax_owns_is_in_place(rng, layout):
    """kv_cache_to_torch gives a view of JAX's buffer: write_kv writes that buffer (same
    address), and JAX reads the new K/V from it."""
    jax = pytest.importorskip("jax")
    if DEVICE != "cpu":
        pytest.skip("the JAX cache lives on the CPU here")
    spec = _spec(layout=layout)
    problem = random_problem(spec, [1, 3, 9], [129, 3, 300], rng, num_tokens=15)
    jax_cache = jax.numpy.asarray(problem.kv_cache)
    view = interop.kv_cache_to_torch(jax_cache, spec)
    assert view.data_ptr() == jax_cache.unsafe_buffer_pointer(), "kv_cache_to_torch copied"
    slots = torch.from_numpy(problem.metadata.slot_mapping)
    key = interop.to_torch(problem.key)
    value = interop.to_torch(problem.value)
    torch_sparse.write_kv(view, key, value, slots, spec)
    assert view.data_ptr() == jax_cache.unsafe_buffer_pointer()
    # Read through a JAX operation (a fresh computation on JAX's buffer).
    seen = interop.kv_cache_to_torch(np.asarray(jax_cache + 0), spec)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            page, offset = divmod(slot, spec.block_size)
            assert torch.equal(seen[page, 0, offset], key[t]), f"{layout}: JAX misses K of {t}"
            assert torch.equal(seen[page, 1, offset], value[t]), f"{layout}: JAX misses V of {t}"



# --- knobs (issue 20): grouped per kernel family, never silently dropped ---------------------

def test_knob_configs():
    from torch_sparse.attention import TokenKernelConfig
    from torch_sparse.cache import WriteKVConfig
    from torch_sparse.k2q import K2QConfig
    from torch_sparse.union import UnionConfig
    for config in (TokenKernelConfig, UnionConfig, K2QConfig, WriteKVConfig):
        default = config.get_default()
        assert default == config() and hash(default) == hash(config())
        with pytest.raises(dataclasses.FrozenInstanceError):
            default.num_warps = 2
        with pytest.raises(ValueError, match=f"{config.__name__}.num_warps"):
            config(num_warps=0)
        with pytest.raises(TypeError, match=f"{config.__name__}.num_warps"):
            config(num_warps=4.0)
    assert TokenKernelConfig.get_default().num_splits is None  # from the shapes
    with pytest.raises(TypeError, match="partial_dtype"):
        K2QConfig(partial_dtype=torch.int8)


def test_knobs_the_implementation_ignores_raise(rng, monkeypatch):
    problem = _problem(rng)
    t = _tensors(problem)
    args = (problem.spec, t["query"], t["kv_cache"], t["topk"], t["metadata"])
    split = torch_sparse.sparse_attention(*args, implementation="triton", num_splits=1,
                                          num_warps=2, num_stages=1)
    default = torch_sparse.sparse_attention(*args, implementation="triton")
    err = relative_error(split, default)
    assert err < TOL, f"num_splits=1 against the default split count: {err:.3e}"
    with pytest.raises(ValueError, match="num_splits.*'eager'"):
        torch_sparse.sparse_attention(*args, implementation="eager", num_splits=2)
    md = t["metadata"]
    nd = md.num_decode_tokens
    with pytest.raises(ValueError, match="num_warps.*'eager'"):
        torch_sparse.minimax_m3_sparse_attn_decode(
            t["query"][:nd], t["kv_cache"], t["topk"][:, :nd], md.decode.block_table,
            md.decode.seq_lens, 2, 0.1, torch.empty_like(t["query"][:nd]), 1,
            implementation="eager", num_warps=4)
    with pytest.raises(TypeError, match="num_stages"):
        torch_sparse.sparse_attention(*args, implementation="triton", num_stages="2")
    with pytest.raises(ValueError, match="num_splits"):
        torch_sparse.sparse_attention(*args, implementation="triton", num_splits=0)
    # The dispatcher: a family's config with an algorithm that never runs that family.
    from torch_sparse.k2q import K2QConfig
    from torch_sparse.union import UnionConfig
    launched = []
    monkeypatch.setattr(dispatch, "launch_sparse_attention", lambda *a, **k: launched.append(a))
    call = (t["query"], t["kv_cache"], t["topk"], md.block_table, md.token_to_req,
            md.token_positions, torch.empty_like(t["query"]), 0.1)
    for algorithm, bad in (("token", dict(union_config=UnionConfig())),
                           ("token", dict(k2q_config=K2QConfig())),
                           ("union", dict(k2q_config=K2QConfig())),
                           ("k2q", dict(union_config=UnionConfig()))):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}.*{algorithm!r}"):
            dispatch.sparse_attention(*call, first_prefill_token=nd, prefill_algorithm=algorithm,
                                      **bad)
    assert not launched, "a dispatcher call with an unused config launched a kernel"
