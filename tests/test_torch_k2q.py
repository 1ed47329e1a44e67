"""torch_sparse.k2q (key-to-query prefill) against the float64 reference: the launcher on mixed
batches (interpreted on a CPU), its plan against a NumPy inversion, chunking, token masks,
and the main kernel compiled for sm_90 (wgmma)."""
import numpy as np
import pytest

import interop
from interop.testing import make_topk, random_problem, relative_error
from tests.compiled import run_without_interpreter
from tests.device_reference import torch_reference
from tests.helpers import TOL, torch_device
from tests.helpers import reference as _reference

torch = pytest.importorskip("torch")
from torch_sparse import k2q  # noqa: E402

DEVICE = torch_device()
# (kv_cache_dtype, layout, scale_mode, query dtype): every storage dtype in both layouts.
CACHES = [
    ("auto", "NHD", "none", "bfloat16"),
    ("auto", "HND", "none", "float16"),
    ("auto", "HND", "none", "bfloat16"),
    ("float16", "NHD", "none", "float16"),
    ("fp8_e4m3", "NHD", "scalar", "bfloat16"),
    ("fp8_e4m3", "HND", "per_slot", "float16"),
    ("fp8_e5m2", "HND", "scalar", "float16"),
    ("fp8_e5m2", "NHD", "per_slot", "bfloat16"),
]
GQA = [(16, 1), (8, 2)]
# Three decodes, then prefills with and without context (a 24-token one crosses a block
# boundary at position 128), and two padding tokens.
QUERY_LENS, SEQ_LENS = [1, 1, 1, 12, 24, 9], [300, 130, 600, 12, 140, 9]


def _spec(heads=(8, 2), cache="auto", layout="NHD", topk=4):
    return interop.SparseAttentionSpec(heads[0], heads[1], topk_blocks=topk,
                                       kv_cache_dtype=cache, kv_cache_layout=layout)


def _problem(rng, spec, *, rho=None, scale_mode="none", qdtype="bfloat16", **selection):
    problem = random_problem(spec, QUERY_LENS, SEQ_LENS, rng, query_dtype=qdtype,
                             scale_mode=scale_mode, num_tokens=sum(QUERY_LENS) + 2, **selection)
    if rho is not None:
        problem.topk_indices = make_topk(problem.metadata, spec.num_kv_heads, spec.topk_blocks,
                                         rng, rho=rho, **selection)
    return problem


def _run(problem, *, first_token=None, token_mask=None, topk=None, metadata=None,
         kv_cache=None):
    """launch_k2q on the problem (NaN-poisoned output); returns (output, first_token)."""
    md = problem.metadata if metadata is None else metadata
    first = md.num_decode_tokens if first_token is None else first_token
    t = interop.to_torch(md, DEVICE)
    query = interop.to_torch(problem.query, DEVICE)
    if kv_cache is None:
        kv_cache = interop.kv_cache_to_torch(problem.kv_cache, problem.spec).to(DEVICE)
    scales = [torch.tensor(s, dtype=torch.float32, device=DEVICE) if s is not None else None
              for s in (problem.k_scale, problem.v_scale)]
    out = torch.full_like(query, float("nan"))  # an unwritten element fails
    mask = None if token_mask is None else torch.from_numpy(token_mask).to(DEVICE)
    k2q.launch_k2q(query, kv_cache,
                   interop.to_torch(problem.topk_indices if topk is None else topk, DEVICE),
                   t.block_table, t.token_to_req, t.token_positions, out, problem.spec.scale,
                   k_scale=scales[0], v_scale=scales[1], first_token=first, token_mask=mask)
    return out.float().cpu().numpy(), first


def _check(out, ref, rows, case):
    """Rows `rows` (bool [num_tokens]) match the reference; every other row is untouched."""
    err = relative_error(out[rows], ref[rows])
    untouched = np.isnan(out[~rows]).all()
    assert err < TOL and untouched, (f"{case}: relative error {err:.3e} (limit {TOL}), rows "
                                     f"outside the call untouched: {untouched}")


def _rows(problem, first_token, token_mask=None):
    rows = np.arange(problem.query.shape[0]) >= first_token
    return rows if token_mask is None else rows & token_mask


# --- the launcher against the reference --------------------------------------------------------

# Every cache row, the GQA groups taking turns.
@pytest.mark.parametrize("cache,layout,scale_mode,qdtype,heads",
                         [(*c, GQA[i % 2]) for i, c in enumerate(CACHES)], ids=lambda c: str(c))
def test_k2q_matches_reference(rng, cache, layout, scale_mode, qdtype, heads):
    """A mixed batch from the first prefill token on: scattered sentinels, future blocks, empty
    rows and padding tokens; decode rows stay untouched."""
    problem = _problem(rng, _spec(heads, cache, layout), scale_mode=scale_mode, qdtype=qdtype,
                       scatter=True, future_fraction=0.3, empty_fraction=0.1)
    out, first = _run(problem)
    case = f"{cache}/{layout}/{scale_mode}/{qdtype} heads={heads}"
    _check(out, _reference(problem), _rows(problem, first), case)
    assert not np.abs(out[-2:]).sum(), f"{case}: padding tokens must get zeros"


@pytest.mark.parametrize("heads", GQA + [(12, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_correlated_selection(rng, heads):
    """M3-like overlap (rho 0.87): long segments, items of several full tiles; a group of 6
    pads to 16 rows per token."""
    problem = _problem(rng, _spec(heads, topk=8), rho=0.87, future_fraction=0.2)
    out, first = _run(problem)
    _check(out, _reference(problem), _rows(problem, first), f"rho=0.87 heads={heads}")


@pytest.mark.parametrize("selection", ["all_empty", "first_token_0"])
def test_empty_rows_and_whole_batch(rng, selection):
    """No valid entry anywhere gives zeros; first_token 0 runs the decodes through K2Q too."""
    if selection == "all_empty":
        problem = _problem(rng, _spec(), empty_fraction=1.0)
        out, first = _run(problem)
        assert not np.abs(out[first:]).sum(), "rows with no valid entry must give zeros"
        assert np.isnan(out[:first]).all(), "decode rows must stay untouched"
    else:
        problem = _problem(rng, _spec(), scatter=True)
        out, first = _run(problem, first_token=0)
        _check(out, _reference(problem), _rows(problem, first), selection)


def test_token_mask(rng):
    """Only the masked-in rows are attended and written (a top-k width of 6: padded columns)."""
    problem = _problem(rng, _spec((16, 1), topk=6), rho=0.87, scatter=True)
    mask = rng.random(problem.query.shape[0]) < 0.5
    out, first = _run(problem, token_mask=mask)
    _check(out, _reference(problem), _rows(problem, first, mask), "token_mask")


@pytest.mark.parametrize("masked,partial_dtype", [(False, None), (True, torch.float32)])
def test_chunked(rng, monkeypatch, masked, partial_dtype):
    """A workspace of a few tokens: many chunks, one plan and one combine each."""
    spec = _spec((8, 2), "fp8_e4m3", "HND")
    problem = _problem(rng, spec, scale_mode="per_slot", rho=0.87, future_fraction=0.2)
    part_bytes = 4 * spec.topk_blocks * spec.num_heads * spec.head_size
    monkeypatch.setattr(interop.tiling, "K2Q_WORKSPACE_BYTES", 7 * part_bytes)
    monkeypatch.setattr(k2q, "PARTIAL_DTYPE", partial_dtype)
    assert interop.tiling.k2q_tokens_per_chunk(2, 8, 128, spec.topk_blocks, 4) < 7
    mask = rng.random(problem.query.shape[0]) < 0.7 if masked else None
    out, first = _run(problem, token_mask=mask)
    _check(out, _reference(problem), _rows(problem, first, mask), f"chunked masked={masked} partials {partial_dtype}")


def test_shared_pages_and_garbage_stay_inside_the_cache(rng):
    """Two requests sharing a page (tiles mixing requests), huge / negative int64 top-k entries
    and bad block-table pages: the cache sits between NaN guard blocks, so any read outside it
    would poison the output."""
    problem = _problem(rng, _spec(), scatter=True)
    md = problem.metadata
    table = md.block_table.copy()
    # Requests 4 (positions 116..139) and 5 (0..8) share their block 0 page.
    table[5, 0] = table[4, 0]
    table[3, 1] = -5                      # a block the prefill of request 3 cannot select
    table[4, 1] = problem.kv_cache.shape[0] + 3
    table[:, -1] = np.iinfo(np.int32).max
    bad_md = md.replace(block_table=table)
    topk = problem.topk_indices.astype(np.int64)
    junk = np.array([np.iinfo(np.int64).min, np.iinfo(np.int32).max, -7, 10**12, 1, 5], np.int64)
    pick = rng.random(topk.shape) < 0.3
    topk[pick] = rng.choice(junk, size=int(pick.sum()))
    logical = interop.kv_cache_to_torch(problem.kv_cache, problem.spec)
    guarded = torch.full((logical.shape[0] + 8,) + tuple(logical.shape[1:]), float("nan"),
                         dtype=logical.dtype, device=DEVICE)
    guarded[4:-4] = logical
    out, first = _run(problem, topk=topk, metadata=bad_md, kv_cache=guarded[4:-4])
    _check(out, _reference(problem, topk, bad_md), _rows(problem, first), "garbage / shared")


# --- the plan alone ----------------------------------------------------------------------------

def _numpy_pairs(topk, table, token_to_req, positions, num_blocks, first, end, mask, bs=128):
    """{(kv_head, page, token, column, last visible offset)} of the valid entries."""
    pairs = set()
    for g in range(topk.shape[0]):
        for t in range(first, end):
            r, p = int(token_to_req[t]), int(positions[t])
            if not mask[t] or p < 0 or not 0 <= r < table.shape[0]:
                continue
            for k, b in enumerate(topk[g, t]):
                if 0 <= b < min(p // bs + 1, table.shape[1]) and 0 <= table[r, b] < num_blocks:
                    pairs.add((g, int(table[r, b]), t, k, p - int(b) * bs))
    return pairs


@pytest.mark.parametrize("pairs_per_item", [1, 8])
def test_plan_matches_numpy_inversion(rng, pairs_per_item):
    spec = _spec((8, 2), topk=6)
    problem = _problem(rng, spec, rho=0.87, scatter=True, future_fraction=0.3,
                       empty_fraction=0.1)
    md = problem.metadata
    num_blocks = problem.kv_cache.shape[0]
    table = md.block_table.copy()
    table[5, 0] = table[4, 0]
    table[4, 1] = -3
    topk = problem.topk_indices.copy()
    topk[:, ::5, 1] = 10**6
    mask = rng.random(problem.query.shape[0]) < 0.8
    first, end = md.num_decode_tokens - 1, problem.query.shape[0] - 3
    t = interop.to_torch(md.replace(block_table=table))
    plan = k2q.plan_k2q(torch.from_numpy(topk), t.block_table, t.token_to_req,
                        t.token_positions, num_blocks, first_token=first, end_token=end,
                        token_mask=torch.from_numpy(mask), pairs_per_item=pairs_per_item)
    key, token, column, last, items = (x.numpy() for x in plan)
    expected = _numpy_pairs(topk, table, md.token_to_req, md.token_positions, num_blocks,
                            first, end, mask)
    n = len(expected)
    sentinel = spec.num_kv_heads * num_blocks
    got = set(zip((key[:n] // num_blocks).tolist(), (key[:n] % num_blocks).tolist(),
                  token[:n].tolist(), column[:n].tolist(), last[:n].tolist()))
    assert key.shape[0] == spec.num_kv_heads * (end - first) * spec.topk_blocks
    assert got == expected and (key[:n] < sentinel).all() and (key[n:] == sentinel).all(), \
        "the plan's pairs differ from the NumPy inversion"
    order = np.lexsort((column[:n], token[:n], key[:n]))
    assert (order == np.arange(n)).all(), "pairs are not sorted by (segment, token, column)"
    starts = [i for i in range(n)
              if (i - np.searchsorted(key[:n], key[i])) % pairs_per_item == 0]
    assert items.shape[0] == interop.tiling.max_k2q_items(spec.num_kv_heads, end - first,
                                               spec.topk_blocks, num_blocks, *table.shape,
                                               pairs_per_item)
    assert items[:len(starts)].tolist() == starts and (items[len(starts):] == -1).all(), \
        "work items are not every pairs_per_item-th pair of each segment, in order"


# --- GPU compilation, checked on the CPU -------------------------------------------------------

def _compile_for_sm90():
    """Compile both kernels for sm_90; print, per main-kernel case, whether wgmma is used."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ("num_pairs num_blocks first_token stride_qt stride_qh stride_blk stride_kv "
            "stride_tok stride_head stride_pk stride_pt stride_ph stride_lk stride_lt ks_head "
            "ks_slot vs_head vs_slot").split()
    target = GPUTarget("cuda", 90, 32)
    options = dict(num_warps=k2q.NUM_WARPS, num_stages=k2q.NUM_STAGES)
    for qdt, cdt, dot in (("bf16", "bf16", tl.bfloat16), ("bf16", "fp8e4nv", tl.float16),
                          ("fp16", "fp8e5", tl.float16)):
        fp8 = cdt.startswith("fp8")
        signature = dict(q_ptr="*" + qdt, cache_ptr="*" + cdt, key_ptr="*i64",
                         token_ptr="*i32", slot_ptr="*i32", limit_ptr="*i32", item_ptr="*i32",
                         part_ptr="*" + qdt, lse_ptr="*fp32", k_scale_ptr="*fp32",
                         v_scale_ptr="*fp32", qk_scale="fp32", **dict.fromkeys(ints, "i32"))
        constexprs = dict(GROUP=16, GROUP_PAD=16, PAIRS=interop.tiling.k2q_tile_shape(16)[1],
                          TILES=k2q.TILES_PER_ITEM, HEAD_SIZE=128, BLOCK_SIZE=128,
                          HAS_K_SCALE=fp8, HAS_V_SCALE=fp8, FP16_COMPUTE=fp8, DOT_DTYPE=dot)
        compiled = triton.compile(ASTSource(k2q._k2q_block_kernel, signature, constexprs),
                                  target=target, options=options)
        print(f"{qdt}/{cdt} wgmma={'wgmma.mma_async' in compiled.asm['ptx']}")
    combine_ints = ("first_token num_reqs num_blocks max_blocks stride_pk stride_pt stride_ph "
                    "stride_lk stride_lt stride_ot stride_oh stride_kg stride_kt stride_kk "
                    "stride_bt").split()
    signature = dict(part_ptr="*bf16", lse_ptr="*fp32", out_ptr="*bf16", topk_ptr="*i32",
                     block_table_ptr="*i32", token_to_req_ptr="*i32", positions_ptr="*i32",
                     mask_ptr="*i1", **dict.fromkeys(combine_ints, "i32"))
    for has_mask in (False, True):
        constexprs = dict(GROUP=16, GROUP_PAD=16, HEAD_SIZE=128, BLOCK_SIZE=128, TOPK=16,
                          TOPK_PAD=16, HAS_MASK=has_mask)
        triton.compile(ASTSource(k2q._k2q_combine_kernel, signature, constexprs),
                       target=target, options=options)
    print("combine compiled")


def test_main_kernel_uses_wgmma_on_sm90():
    """Compiled (not interpreted) in a child process: the kernels must be JIT functions."""
    lines = run_without_interpreter("test_torch_k2q", "_compile_for_sm90")
    for case in ("bf16/bf16", "bf16/fp8e4nv", "fp16/fp8e5"):
        assert f"{case} wgmma=True" in lines, f"{case}: no wgmma in the sm_90 PTX: {lines}"
    assert "combine compiled" in lines


# --- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["auto", "fp8_e4m3"])
def test_gpu_m3_shapes_and_cuda_graph(rng, cache):
    """M3 shapes (64 q heads / 4 kv heads, top-16), correlated selections, replayed from a
    CUDA graph (the plan and both kernels run without a host sync)."""
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache)
    problem = random_problem(spec, [2, 600, 900], [700, 2600, 900], rng, decode_query_len=2,
                             scale_mode="scalar" if cache != "auto" else "none")
    problem.topk_indices = make_topk(problem.metadata, 4, 16, rng, rho=0.87)
    ref = torch_reference(spec, problem.query, problem.kv_cache, problem.topk_indices,
                          problem.metadata, problem.k_scale, problem.v_scale)  # on the device
    eager, first = _run(problem)
    _check(eager, ref, _rows(problem, first), f"gpu {cache} eager")
    t = interop.to_torch(problem.metadata, DEVICE)
    query = interop.to_torch(problem.query, DEVICE)
    kv_cache = interop.kv_cache_to_torch(problem.kv_cache, spec).to(DEVICE)
    topk = interop.to_torch(problem.topk_indices, DEVICE)
    k_scale, v_scale = (None if s is None else torch.tensor(s, dtype=torch.float32,
                                                            device=DEVICE)
                        for s in (problem.k_scale, problem.v_scale))
    out = torch.full_like(query, float("nan"))

    def call():
        k2q.launch_k2q(query, kv_cache, topk, t.block_table, t.token_to_req,
                       t.token_positions, out, spec.scale, k_scale=k_scale, v_scale=v_scale,
                       first_token=first)

    call()  # compile outside the capture
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.float().cpu().numpy()
    _check(replayed, ref, _rows(problem, first), f"gpu {cache} graph")
