"""torch_sparse prefill algorithms against the float64 reference: every `prefill_algorithm`
forced and "auto" (both of its leftover paths) on mixed decode + prefill batches (interpreted
on a CPU), `plan_union` against a NumPy union, the token kernel's token mask, bad algorithm
names, and the union kernel compiled for sm_90 (wgmma)."""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import make_topk, random_problem, relative_error
from tests.compiled import run_without_interpreter
from tests.helpers import TOL, torch_device
from tests.helpers import reference as _reference
from tests.helpers import torch_inputs as _torch

torch = pytest.importorskip("torch")
import torch_sparse  # noqa: E402
from torch_sparse import attention, dispatch, ops, union  # noqa: E402

DEVICE = torch_device()
# (kv_cache_dtype, layout, scale_mode, query dtype, (num_heads, num_kv_heads)): every storage
# dtype in both layouts, every scale mode, both query dtypes and GQA groups.
CASES = [
    ("auto", "NHD", "none", "bfloat16", (16, 1)),
    ("auto", "HND", "none", "float16", (8, 2)),
    ("auto", "HND", "none", "bfloat16", (8, 2)),
    ("float16", "NHD", "none", "float16", (16, 1)),
    ("fp8_e4m3", "HND", "scalar", "bfloat16", (16, 1)),
    ("fp8_e4m3", "NHD", "per_slot", "float16", (8, 2)),
    ("fp8_e5m2", "NHD", "scalar", "float16", (8, 2)),
    ("fp8_e5m2", "HND", "per_slot", "bfloat16", (16, 1)),
]
# Two decodes, then prefills: one with context that crosses the block boundary at position
# 128 (positions 120..139), one starting at position 0, one with a long context; two padding
# tokens. Union tiles start at the first prefill token, so they straddle requests.
QUERY_LENS, SEQ_LENS = [1, 1, 20, 13, 6], [300, 40, 140, 13, 390]


def _spec(heads, cache="auto", layout="NHD", topk=4):
    return interop.SparseAttentionSpec(heads[0], heads[1], topk_blocks=topk,
                                       kv_cache_dtype=cache, kv_cache_layout=layout)


def _problem(rng, spec, selection, scale_mode="none", qdtype="bfloat16"):
    """The batch with a messy random selection or an M3-like correlated one (rho 0.87)."""
    messy = selection == "messy"
    problem = random_problem(spec, QUERY_LENS, SEQ_LENS, rng, query_dtype=qdtype,
                             scale_mode=scale_mode, num_tokens=sum(QUERY_LENS) + 2,
                             scatter=messy, future_fraction=0.3 if messy else 0.0,
                             empty_fraction=0.1 if messy else 0.0)
    if not messy:
        problem.topk_indices = make_topk(problem.metadata, spec.num_kv_heads, spec.topk_blocks,
                                         rng, rho=0.87)
    return problem


def _run(problem, algorithm):
    t = _torch(problem)
    out = torch.full_like(t["query"], float("nan"))  # an unwritten element fails
    torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                  t["metadata"], out, k_scale=t["k_scale"], v_scale=t["v_scale"],
                                  prefill_algorithm=algorithm)
    return out


def _check(out, problem, case):
    err = relative_error(out, _reference(problem))
    assert err < TOL, f"{case}: relative error {err:.3e} (limit {TOL})"
    assert not out[-2:].float().abs().sum(), f"{case}: padding tokens must get zeros"


def _auto_split(monkeypatch, problem, leftover):
    """Make "auto" plan every prefill and give the tiles below the largest union to the union
    kernel (FP8 caches too); leftover: "k2q" or "token" takes the rest. Returns (union tiles,
    other tiles)."""
    spec = problem.spec
    group = spec.num_heads // spec.num_kv_heads
    t = _torch(problem)
    md = t["metadata"]
    tokens = union.tile_tokens(group)
    plan = union.plan_union(t["topk"], md.block_table, md.token_to_req, md.token_positions,
                            problem.kv_cache.shape[0], tile_tokens=tokens,
                            first_token=problem.metadata.num_decode_tokens)
    sizes = plan.tile_size.cpu().numpy()
    limit = int(sizes[sizes < sizes.max()].max(initial=0))
    share = (limit + 0.5) / (tokens * spec.topk_blocks)
    rule = dataclasses.replace(dispatch.PREFILL_RULE, union_min_tokens=0, union_share=share,
                               fp8_union_share=share,
                               k2q_min_tokens=0 if leftover == "k2q" else None)
    monkeypatch.setattr(dispatch, "PREFILL_RULE", rule)
    assert rule.max_union(group, spec.topk_blocks, spec.is_fp8) == limit
    return int((sizes <= limit).sum()), int((sizes > limit).sum())


# The union path with every case (the messy and the correlated selection taking turns); k2q
# through the dispatcher with a 16-bit and an FP8 case (tests/test_torch_k2q.py runs its
# launcher with every case); "auto" split between the union kernel and either leftover path
# with both 16-bit storage dtypes and both FP8 dtypes; "auto-fp8token": a rule that keeps FP8
# caches on the token kernel.
PATHS = ([("union", c, ("messy", "correlated")[i % 2]) for i, c in enumerate(CASES)]
         + [("k2q", CASES[1], "correlated"), ("k2q", CASES[5], "messy")]
         + [("auto-k2q", CASES[0], "correlated"), ("auto-token", CASES[0], "messy"),
            ("auto-k2q", CASES[3], "messy"), ("auto-token", CASES[1], "correlated"),
            ("auto-token", CASES[4], "correlated"), ("auto-k2q", CASES[7], "messy"),
            ("auto-fp8token", CASES[6], "correlated")])


@pytest.mark.parametrize("algorithm,case,selection", PATHS, ids=lambda c: str(c))
def test_prefill_algorithm_matches_reference(rng, monkeypatch, algorithm, case, selection):
    """Decodes on the token kernel, prefill rows on the forced path (or split by "auto")."""
    cache, layout, scale_mode, qdtype, heads = case
    problem = _problem(rng, _spec(heads, cache, layout), selection, scale_mode, qdtype)
    case = f"{algorithm} {cache}/{layout}/{scale_mode}/{qdtype} heads={heads} {selection}"
    if algorithm == "auto-fp8token":
        _auto_split(monkeypatch, problem, "k2q")
        monkeypatch.setattr(dispatch, "PREFILL_RULE", dataclasses.replace(
            dispatch.PREFILL_RULE, fp8_union_share=None))

        def elsewhere(*args, **kwargs):
            raise AssertionError(f"{case}: not the token kernel")
        monkeypatch.setattr(dispatch, "launch_union", elsewhere)
        monkeypatch.setattr(dispatch, "launch_k2q", elsewhere)
        _check(_run(problem, "auto"), problem, case)
        return
    if algorithm.startswith("auto"):
        tiles = _auto_split(monkeypatch, problem, algorithm.split("-")[1])
        assert min(tiles) > 0, f"{case}: auto must use both paths, got {tiles} tiles"
        algorithm = "auto"
    _check(_run(problem, algorithm), problem, case)


# UnionConfig.fp8_dot rounds queries and probabilities to e4m3 (3 mantissa bits): interpreted,
# 0.052-0.073 relative error against the float64 reference (the default path: 0.003).
FP8_DOT_TOL = 0.1


@pytest.mark.parametrize("heads,scale_mode,algorithm", [((16, 1), "none", "union"),
                                                        ((8, 2), "scalar", "auto")])
def test_fp8_dot_matches_reference(rng, monkeypatch, heads, scale_mode, algorithm):
    """sparse_attention(fp8_dot=True): the union kernel's FP8 tensor-core path on the prefill
    rows it runs ("auto": split with the token kernel), decodes on the token kernel, within the
    path's own measured tolerance."""
    problem = _problem(rng, _spec(heads, "fp8_e4m3", "HND"), "correlated", scale_mode)
    case = f"fp8_dot {heads} {scale_mode} {algorithm}"
    if algorithm == "auto":
        tiles = _auto_split(monkeypatch, problem, "token")
        assert min(tiles) > 0, f"{case}: auto must use both paths, got {tiles} tiles"
    # An Inf in one prefill query row (e4m3 saturates it): that row alone turns NaN.
    bad = problem.metadata.num_decode_tokens + 3
    problem.query[bad, 0, 5] = np.inf
    t = _torch(problem)
    out = torch.full_like(t["query"], float("nan"))
    torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                  t["metadata"], out, k_scale=t["k_scale"], v_scale=t["v_scale"],
                                  prefill_algorithm=algorithm, fp8_dot=True)
    assert out[bad, 0].isnan().all(), f"{case}: a query row with an Inf must give NaN"
    keep = np.ones(out.shape[:2], bool)
    keep[bad, 0] = False
    err = relative_error(out.double().cpu().numpy()[keep], _reference(problem)[keep])
    assert err < FP8_DOT_TOL, f"{case}: relative error {err:.3e} (limit {FP8_DOT_TOL})"


def test_fp8_dot_errors_before_any_launch(rng, monkeypatch):
    """fp8_dot where it does not exist: a ValueError (TypeError for a non-bool) naming why,
    before any kernel runs."""
    def launched(*args, **kwargs):
        raise AssertionError("an op ran although fp8_dot cannot")
    monkeypatch.setattr(ops, "call_sparse_attn", launched)
    for cache, scale_mode, kw, error, match in [
            ("fp8_e5m2", "none", {}, ValueError, "fp8_e4m3"),
            ("auto", "none", {}, ValueError, "fp8_e4m3"),
            ("fp8_e4m3", "none", dict(prefill_algorithm="token"), ValueError, "'token'"),
            ("fp8_e4m3", "none", dict(prefill_algorithm="k2q"), ValueError, "'k2q'"),
            ("fp8_e4m3", "none", dict(implementation="eager"), ValueError, "'eager'"),
            ("fp8_e4m3", "per_slot", {}, ValueError, "scalar v_scale"),
            ("fp8_e4m3", "none", dict(fp8_dot=1), TypeError, "fp8_dot must be a bool")]:
        problem = random_problem(_spec((8, 2), cache), [1, 20], [200, 20], rng,
                                 scale_mode=scale_mode)
        t = _torch(problem)
        with pytest.raises(error, match=match):
            torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                          t["metadata"], k_scale=t["k_scale"],
                                          v_scale=t["v_scale"], **dict(dict(fp8_dot=True), **kw))
    args = (t["query"], t["kv_cache"], t["topk"], t["metadata"].block_table,
            t["metadata"].token_to_req, t["metadata"].token_positions, t["query"].clone(), 0.1)
    with pytest.raises(ValueError, match="fp8_e4m3"):  # the launcher checks too
        union.launch_union(*args[:1], t["kv_cache"].view(torch.float8_e5m2), *args[2:],
                           config=union.UnionConfig(fp8_dot=True))
    with pytest.raises(TypeError, match="fp8_dot"):
        union.UnionConfig(fp8_dot=1)


@pytest.mark.parametrize("algorithm", ["token", "auto"])
def test_token_and_small_auto(rng, algorithm):
    """"token" and "auto" below UNION_MIN_TOKENS: one token-kernel launch, as always."""
    assert sum(QUERY_LENS) < dispatch.PREFILL_RULE.union_min_tokens
    problem = _problem(rng, _spec((8, 2), "fp8_e4m3", "HND"), "messy", "per_slot")
    _check(_run(problem, algorithm), problem, algorithm)


@pytest.mark.parametrize("algorithm", ["union", "k2q"])
def test_seed_prefill_call(rng, algorithm):
    """The seed's prefill call (every row a prefill token) with a forced algorithm, and the
    reference impl, which takes the keyword and ignores it."""
    spec = _spec((16, 1), layout="HND")
    problem = random_problem(spec, [12, 9, 7], [12, 140, 400], rng, scatter=True,
                             future_fraction=0.2)
    t = _torch(problem)
    pre = t["metadata"].prefill
    for impl in ("triton", "reference"):
        out = torch.full_like(t["query"], float("nan"))
        torch_sparse.minimax_m3_sparse_attn(
            t["query"], t["kv_cache"], t["topk"], pre.block_table, pre.cu_seqlens_q,
            pre.seq_lens, pre.context_lens, pre.max_query_len, 1, spec.scale, out, impl=impl,
            prefill_algorithm=algorithm)
        err = relative_error(out, _reference(problem))
        assert err < TOL, f"seed prefill {algorithm} {impl}: relative error {err:.3e}"


@pytest.mark.parametrize("splits", [1, 2])
def test_token_kernel_token_mask(rng, splits):
    """Masked-off rows are neither attended nor written (NaN stays), with and without split-K."""
    problem = _problem(rng, _spec((8, 2)), "messy")
    t = _torch(problem)
    md = t["metadata"]
    mask = torch.from_numpy(rng.random(t["query"].shape[0]) < 0.5).to(DEVICE)
    out = torch.full_like(t["query"], float("nan"))
    attention.launch_sparse_attention(t["query"], t["kv_cache"], t["topk"], md.block_table, out,
                                      problem.spec.scale, token_to_req=md.token_to_req,
                                      token_positions=md.token_positions, token_mask=mask,
                                      num_splits=splits)
    rows = mask.cpu().numpy()
    assert out[~mask].isnan().all(), f"splits={splits}: masked-off rows were written"
    err = relative_error(out[mask], _reference(problem)[rows])
    assert err < TOL, f"token mask splits={splits}: relative error {err:.3e}"


def _numpy_union(topk, block_table, token_to_req, positions, num_blocks, first, end, tile,
                 block_size=128):
    """{(kv_head, tile): {(page, block): token bits}} straight from the contract's rule."""
    num_reqs, max_blocks = block_table.shape
    unions = {}
    for g in range(topk.shape[0]):
        for t in range(first, end):
            entries = unions.setdefault((g, (t - first) // tile), {})
            r, p = int(token_to_req[t]), int(positions[t])
            if p < 0 or not 0 <= r < num_reqs:
                continue
            for b in set(int(b) for b in topk[g, t]):
                if 0 <= b <= p // block_size and b < max_blocks:
                    page = int(block_table[r, b])
                    if 0 <= page < num_blocks:
                        entries[(page, b)] = entries.get((page, b), 0) | 1 << (t - first) % tile
    return unions


@pytest.mark.parametrize("tile", [8, 16])
def test_plan_union_matches_numpy(rng, tile):
    """Garbage entries, repeats in a row, a page shared by two requests (one entry for both),
    bad pages in the block table and padding tokens, over a chunk that is not tile-aligned."""
    spec = _spec((16, 2), topk=6)
    problem = random_problem(spec, [1, 11, 30, 17], [200, 140, 30, 300], rng,
                             num_tokens=62, scatter=True, future_fraction=0.3)
    md = problem.metadata
    topk = problem.topk_indices.copy()
    junk = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max, -3, 10**6, 0, 1], np.int32)
    pick = rng.random(topk.shape) < 0.2
    topk[pick] = rng.choice(junk, size=int(pick.sum()))
    topk[:, 20, 1] = topk[:, 20, 0]  # a repeated (valid) entry
    table = md.block_table.copy()
    table[2, 0] = table[1, 0]        # requests 1 and 2 share the page of block 0
    table[3, 1] = -4
    table[3, 2] = problem.kv_cache.shape[0] + 9
    num_blocks = problem.kv_cache.shape[0]
    first, end = 3, 59
    plan = union.plan_union(torch.from_numpy(topk), torch.from_numpy(table),
                            torch.from_numpy(md.token_to_req),
                            torch.from_numpy(md.token_positions), num_blocks, tile_tokens=tile,
                            first_token=first, end_token=end)
    expected = _numpy_union(topk, table, md.token_to_req, md.token_positions, num_blocks, first,
                            end, tile)
    num_tiles = -(-(end - first) // tile)
    width = tile * spec.topk_blocks
    assert plan.page.shape == (spec.num_kv_heads, num_tiles, width)
    assert (plan.first_token, plan.end_token, plan.tile_tokens) == (first, end, tile)
    page, block, bits = (x.numpy() for x in (plan.page, plan.block, plan.token_bits))
    size = plan.size.numpy()
    for (g, i), entries in expected.items():
        n = len(entries)
        got = {(int(p), int(b)): int(m) for p, b, m in
               zip(page[g, i, :n], block[g, i, :n], bits[g, i, :n])}
        assert size[g, i] == n and got == entries, f"tile {i} head {g}: {got} != {entries}"
        keys = page[g, i, :n].astype(np.int64) * table.shape[1] + block[g, i, :n]
        assert (np.diff(keys) > 0).all(), f"tile {i} head {g}: entries not in page order"
        assert ((page[g, i, n:] == -1).all() and not block[g, i, n:].any()
                and not bits[g, i, n:].any()), f"tile {i} head {g}: tail"
    assert (plan.tile_size.numpy() == size.max(0)).all()


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_unknown_prefill_algorithm_raises_before_launch(rng, monkeypatch, impl):
    def launched(*args, **kwargs):
        raise AssertionError("an op ran although the prefill algorithm is unknown")
    monkeypatch.setattr(ops, "call_sparse_attn", launched)
    problem = random_problem(_spec((8, 2)), [1, 20], [200, 20], rng)
    t = _torch(problem)
    with pytest.raises(ValueError, match="prefill_algorithm"):
        torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                      t["metadata"], impl=impl, prefill_algorithm="flash")
    pre = t["metadata"].prefill
    with pytest.raises(ValueError, match="prefill_algorithm"):
        torch_sparse.minimax_m3_sparse_attn(
            t["query"][1:], t["kv_cache"], t["topk"][:, 1:], pre.block_table, pre.cu_seqlens_q,
            pre.seq_lens, pre.context_lens, 20, 2, 0.1, torch.empty_like(t["query"][1:]),
            impl=impl, prefill_algorithm=None)


def test_compile_fullgraph_with_prefill_algorithm(rng):
    """The op's new str / int arguments trace with fullgraph=True (AOT, fake tensors)."""
    problem = _problem(rng, _spec((16, 1)), "correlated")
    t = _torch(problem)

    def step(query, kv_cache, topk):
        out = torch.empty_like(query)
        torch_sparse.sparse_attention(problem.spec, query * 1.0, kv_cache, topk, t["metadata"],
                                      out, prefill_algorithm="union")
        return out + 0.0

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(t["query"], t["kv_cache"],
                                                                   t["topk"])
    _check(out, problem, "torch.compile union")


def _compile_for_sm90():
    """Compile the union kernel for CUDA sm_90 (no GPU needed) at GQA 16 (8 tokens x 16 heads =
    128 rows) with a bf16 cache and an FP8 one (float16 compute); print whether wgmma is used."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = union._union_attn_kernel
    for case in ("bf16", "fp8e4nv", "fp8dot"):
        cache_dtype = "bf16" if case == "bf16" else "fp8e4nv"
        fp8, fp8_dot = case != "bf16", case == "fp8dot"
        constexprs = dict(GROUP=16, GROUP_PAD=16, TILE_TOKENS=8, HEAD_SIZE=128,
                          BLOCK_SIZE=128, ENTRIES=128, HAS_K_SCALE=fp8,
                          HAS_V_SCALE=fp8 and not fp8_dot, FP16_COMPUTE=fp8, FP8_DOT=fp8_dot,
                          V_SCALE_AT_END=fp8_dot,
                          DOT_DTYPE=tl.float8e4nv if fp8_dot else tl.float16 if fp8
                          else tl.bfloat16, DYNAMIC_LOOP=True)
        pointers = dict(q_ptr="*bf16", cache_ptr=f"*{cache_dtype}", positions_ptr="*i32",
                        out_ptr="*bf16", k_scale_ptr="*fp32", v_scale_ptr="*fp32")
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = pointers.get(name, "*i32")
            else:
                signature[name] = "fp32" if name == "qk_scale" else "i32"
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=union.NUM_WARPS, num_stages=union.NUM_STAGES))
        ptx = compiled.asm["ptx"]
        print(f"{case} wgmma={'wgmma.mma_async' in ptx} e4m3={'e4m3.e4m3' in ptx}")


def _compile_plan_for_sm90():
    """Compile the union plan kernel (sort and scan) for CUDA sm_90, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = union._plan_union_kernel
    constexprs = dict(WIDTH=16, WIDTH_PAD=16, TILE_TOKENS=8, BLOCK_SIZE=128,
                      TOKEN_SLOTS=union._TOKEN_SLOTS, SENTINEL=union._SENTINEL)
    signature = {name: "constexpr" if name in constexprs else
                 "*i32" if name.endswith("_ptr") else "i32" for name in kernel.arg_names}
    import triton
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print(f"plan ptx={len(compiled.asm['ptx']) > 0}")


def test_plan_kernel_compiles_for_sm90():
    assert "plan ptx=True" in run_without_interpreter("test_torch_union", "_compile_plan_for_sm90")


def test_union_kernel_uses_wgmma_on_sm90():
    """Compiled (not interpreted) in a child process: the kernel must be a JIT function."""
    lines = run_without_interpreter("test_torch_union", "_compile_for_sm90")
    for case, e4m3 in (("bf16", False), ("fp8e4nv", False), ("fp8dot", True)):
        assert f"{case} wgmma=True e4m3={e4m3}" in lines, f"{case}: sm_90 PTX: {lines}"
