"""torch_sparse against the float64 reference: the Triton kernels (interpreted on a CPU), the
pure-PyTorch path, write_kv, bad input, the torch.library registration, and (gpu) MiniMax-M3
shapes, CUDA-graph capture and torch.compile."""
import numpy as np
import pytest

import interop
from interop.testing import make_topk, random_problem, relative_error
from tests.compiled import run_without_interpreter
from tests.device_reference import torch_reference
from tests.helpers import TOL, torch_device, torch_run
from tests.helpers import reference as _reference
from tests.helpers import torch_inputs as _torch

torch = pytest.importorskip("torch")
import torch_sparse  # noqa: E402
from torch_sparse import ops  # noqa: E402

DEVICE = torch_device()
# (kv_cache_dtype, layout, scale_mode, query dtype): every cache dtype in both layouts, each
# scale mode with both FP8 formats, both query dtypes.
CACHES = [
    ("auto", "NHD", "none", "bfloat16"),
    ("auto", "HND", "none", "bfloat16"),
    ("auto", "NHD", "none", "float16"),
    ("bfloat16", "HND", "none", "float16"),
    ("fp8_e4m3", "NHD", "none", "bfloat16"),
    ("fp8_e4m3", "HND", "scalar", "bfloat16"),
    ("fp8_e4m3", "NHD", "per_slot", "float16"),
    ("fp8_e5m2", "HND", "none", "float16"),
    ("fp8_e5m2", "NHD", "scalar", "bfloat16"),
    ("fp8_e5m2", "HND", "per_slot", "bfloat16"),
    ("float16", "HND", "none", "float16"),
]
# (num_heads, num_kv_heads): GQA 4 and 16; 2 q heads per kv head exercises group < 16 padding.
GQA = [(8, 2), (16, 1)]


def _mixed(decode_query_len):
    """Three decodes (one at a block edge) then prefills with context (positions 118..129,
    across a block edge) and without (0..4)."""
    lens = decode_query_len
    return [lens, lens, lens, 12, 5], [300, 129 + lens, 600, 130, 5]


def _device_reference(problem):
    """The GPU tests' float32 reference on the device (the float64 one takes seconds per
    M3-shaped case on the host)."""
    return torch_reference(problem.spec, problem.query, problem.kv_cache, problem.topk_indices,
                           problem.metadata, problem.k_scale, problem.v_scale)


def _assert_close(out, ref, case, rows=None):
    out = out[:rows] if rows is not None else out
    ref = ref[:rows] if rows is not None else ref
    err = relative_error(out, ref)
    assert err < TOL, f"{case}: relative error {err:.3e} (limit {TOL})"


_run_sparse_attention = torch_run


def _spec(heads=(8, 2), cache="auto", layout="NHD", topk=4):
    return interop.SparseAttentionSpec(heads[0], heads[1], topk_blocks=topk,
                                       kv_cache_dtype=cache, kv_cache_layout=layout)


# --- the mixed batch through the kernels -------------------------------------------------------

# Each cache row once, the GQA shapes, speculative decodes (L = 2) and the split-K counts
# taking turns: every (cache dtype, layout, scale mode, query dtype) runs, with both GQA groups,
# both decode lengths and 1, 2 and 4 splits of the top-k row (4: a split per entry) across the
# list. (The launcher picks the splits from the shapes; a small batch would always get 4.)
MIXED_CASES = [(*c, GQA[i % 2], 1 + (i // 2) % 2, (1, 2, 4)[i % 3]) for i, c in enumerate(CACHES)]


@pytest.mark.parametrize("cache,layout,scale_mode,qdtype,heads,decode_query_len,splits",
                         MIXED_CASES, ids=lambda c: str(c))
def test_sparse_attention_matches_reference(rng, monkeypatch, cache, layout, scale_mode, qdtype,
                                            heads, decode_query_len, splits):
    """Scattered sentinels, future blocks, empty rows and two padding tokens in every case."""
    monkeypatch.setattr(torch_sparse.attention, "num_splits_for", lambda *shapes: splits)
    spec = _spec(heads, cache, layout)
    query_lens, seq_lens = _mixed(decode_query_len)
    problem = random_problem(spec, query_lens, seq_lens, rng, decode_query_len=decode_query_len,
                             query_dtype=qdtype, scale_mode=scale_mode,
                             num_tokens=sum(query_lens) + 2, scatter=True, future_fraction=0.3,
                             empty_fraction=0.1)
    out = _run_sparse_attention(problem)
    case = f"{cache}/{layout}/{scale_mode}/{qdtype} heads={heads} L={decode_query_len}"
    _assert_close(out, _reference(problem), f"{case} splits={splits}")
    assert not out[-2:].float().abs().sum(), f"{case}: padding tokens must get zeros"


def test_num_splits_for():
    """Split-K from shapes: a power of two, at most the top-k width and MAX_SPLITS, one split
    once the grid alone has TARGET_PROGRAMS programs."""
    splits = torch_sparse.attention.num_splits_for
    target = torch_sparse.attention.TARGET_PROGRAMS
    assert splits(target, 1, 16) == 1 and splits(target // 2, 2, 16) == 1
    assert splits(target // 4, 1, 16) == 4 and splits(target // 6, 1, 16) == 4
    assert splits(1, 1, 16) == min(16, torch_sparse.attention.MAX_SPLITS)
    assert splits(1, 1, 6) == 4 and splits(3, 2, 1) == 1


@pytest.mark.parametrize("selection", ["clean", "future", "empty", "all_empty"])
def test_selection_kinds(rng, selection):
    kwargs = {"clean": {}, "scatter": dict(scatter=True),
              "future": dict(future_fraction=1.0, scatter=True),
              "empty": dict(empty_fraction=0.5), "all_empty": dict(empty_fraction=1.0)}[selection]
    problem = random_problem(_spec(), *_mixed(1), rng, **kwargs)
    out = _run_sparse_attention(problem)
    ref = _reference(problem)
    if selection == "all_empty":
        assert not out.float().abs().sum(), "rows with no valid entry must give zeros"
    else:
        _assert_close(out, ref, selection)


@pytest.mark.parametrize("decode_query_len", [1, 2, 3])
def test_decode_entry_point(rng, decode_query_len):
    """The seed's decode call; 3 requests x 2 heads: split-K (one top-k entry a split) and the
    merge in the same launch."""
    spec = _spec(topk=4)
    lens = decode_query_len
    problem = random_problem(spec, [lens] * 3, [130, 600, lens + 3], rng,
                             decode_query_len=lens, scatter=True, future_fraction=0.2,
                             empty_fraction=0.1)
    assert torch_sparse.attention.num_splits_for(3 * lens, 2, 4) > 1
    t = _torch(problem)
    md = t["metadata"]
    out = torch.full_like(t["query"], float("nan"))
    torch_sparse.minimax_m3_sparse_attn_decode(
        t["query"], t["kv_cache"], t["topk"], md.decode.block_table, md.decode.seq_lens, 2,
        spec.scale, out, lens)
    _assert_close(out, _reference(problem), f"decode L={lens}")
    # The last split merged in the same launch and left the arrival counters at zero, so a
    # second call (reusing them) gives the same output.
    counters = torch_sparse.attention._arrival_counters(out.device, 0)
    assert not counters.any(), f"decode L={lens}: arrival counters left non-zero"
    again = torch.full_like(out, float("nan"))
    torch_sparse.minimax_m3_sparse_attn_decode(
        t["query"], t["kv_cache"], t["topk"], md.decode.block_table, md.decode.seq_lens, 2,
        spec.scale, again, lens)
    assert torch.equal(again, out), f"decode L={lens}: a second call differs"


def _compile_decode_for_sm90():
    """Compile the split-K decode kernel for sm_90; print its synchronisation instructions."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from torch_sparse import attention
    ints = ("num_reqs num_blocks max_blocks stride_qt stride_qh stride_blk stride_kv "
            "stride_tok stride_head stride_kg stride_kt stride_kk stride_bt stride_os "
            "stride_ot stride_oh stride_ls stride_lt stride_fot stride_foh ks_head ks_slot "
            "vs_head vs_slot").split()
    signature = dict(q_ptr="*bf16", cache_ptr="*bf16", topk_ptr="*i32",
                     block_table_ptr="*i32", token_to_req_ptr="*i32", positions_ptr="*i32",
                     token_mask_ptr="*i1", out_ptr="*fp32", lse_ptr="*fp32",
                     k_scale_ptr="*fp32", v_scale_ptr="*fp32", final_ptr="*bf16",
                     counter_ptr="*i32", qk_scale="fp32", **dict.fromkeys(ints, "i32"))
    constexprs = dict(GROUP=16, GROUP_PAD=16, HEAD_SIZE=128, BLOCK_SIZE=128, TOPK=16,
                      TOPK_PAD=16, NUM_SPLITS=16, CHUNK=1, DECODE_QUERY_LEN=1, HAS_TOKEN_MASK=False,
                      HAS_K_SCALE=False, HAS_V_SCALE=False, FP16_COMPUTE=False,
                      DOT_DTYPE=tl.bfloat16)
    compiled = triton.compile(ASTSource(attention._sparse_attn_kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=attention.NUM_WARPS,
                                           num_stages=attention.NUM_STAGES))
    for line in compiled.asm["ptx"].splitlines():
        if "atom." in line or "bar.sync" in line:
            print(line.strip())


def test_decode_merge_synchronises_on_sm90():
    """Compiled (not interpreted), in a child process: the split programs publish their
    partials with a CTA barrier and a gpu-scope acq_rel arrival counter, which is reset."""
    lines = run_without_interpreter("test_torch_token", "_compile_decode_for_sm90")
    atomics = [line for line in lines if "atom." in line]
    assert any("atom.global.gpu.acq_rel.add" in line for line in atomics), lines
    assert any(".exch" in line for line in atomics), f"counter never reset: {atomics}"
    assert any("bar.sync" in line for line in lines), "no CTA barrier before the release"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefill_entry_point(rng, layout):
    """The seed's prefill call on a prefill-only batch (with and without context)."""
    spec = _spec(layout=layout)
    problem = random_problem(spec, [9, 6, 8], [9, 400, 132], rng, scatter=True)
    t = _torch(problem)
    pre = t["metadata"].prefill
    out = torch.full_like(t["query"], float("nan"))
    torch_sparse.minimax_m3_sparse_attn(
        t["query"], t["kv_cache"], t["topk"], pre.block_table, pre.cu_seqlens_q, pre.seq_lens,
        pre.context_lens, pre.max_query_len, 2, spec.scale, out)
    _assert_close(out, _reference(problem), f"prefill {layout}")


@pytest.mark.parametrize("algorithm", ["token", "union", "k2q"])
def test_garbage_topk_and_block_table_stay_inside_the_cache(rng, algorithm):
    """Huge, negative and INT32_MIN entries, and bad pages in the block table, are masked: the
    cache sits between NaN guard blocks, so any read outside it would poison the output."""
    spec = _spec()
    problem = random_problem(spec, *_mixed(2), rng, decode_query_len=2)
    topk = problem.topk_indices.copy()
    junk = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max, -7, 10**9, 5, 6, 64],
                    np.int32)
    pick = rng.random(topk.shape) < 0.4
    topk[pick] = rng.choice(junk, size=int(pick.sum()))
    md = problem.metadata
    num_blocks = problem.kv_cache.shape[0]
    table = md.block_table.copy()
    table[0, 0] = -5               # a used block on a page below the cache
    table[2, 1] = num_blocks + 3   # and one above it
    table[:, -1] = np.iinfo(np.int32).max
    bad_md = md.replace(block_table=table)
    t = _torch(problem)
    guarded = torch.full((num_blocks + 8,) + tuple(t["kv_cache"].shape[1:]), float("nan"),
                         dtype=t["kv_cache"].dtype, device=DEVICE)
    guarded[4:-4] = t["kv_cache"]
    out = _run_sparse_attention(problem, kv_cache=guarded[4:-4],
                                topk=interop.to_torch(topk, DEVICE),
                                metadata=interop.to_torch(bad_md, DEVICE),
                                prefill_algorithm=algorithm)
    _assert_close(out, _reference(problem, topk, bad_md), f"{algorithm} garbage top-k")


@pytest.mark.parametrize("cache,layout,scale_mode", [("auto", "HND", "none"),
                                                     ("fp8_e4m3", "NHD", "per_slot"),
                                                     ("fp8_e5m2", "HND", "scalar")])
def test_reference_impl(rng, cache, layout, scale_mode):
    """The pure-PyTorch path on a mixed batch with speculative decodes and messy rows."""
    problem = random_problem(_spec((16, 2), cache, layout), *_mixed(2), rng, decode_query_len=2,
                             scale_mode=scale_mode, num_tokens=sum(_mixed(2)[0]) + 1,
                             scatter=True, future_fraction=0.3, empty_fraction=0.1)
    out = _run_sparse_attention(problem, impl="reference")
    _assert_close(out, _reference(problem), f"reference impl {cache}/{layout}/{scale_mode}")


def test_reference_impl_seed_calls(rng):
    problem = random_problem(_spec(), [2, 2, 30], [200, 3, 300], rng, decode_query_len=2)
    t = _torch(problem)
    md = t["metadata"]
    out = torch.full_like(t["query"], float("nan"))
    nd = md.num_decode_tokens
    torch_sparse.minimax_m3_sparse_attn_decode(
        t["query"][:nd], t["kv_cache"], t["topk"][:, :nd], md.decode.block_table,
        md.decode.seq_lens, 2, 0.1, out[:nd], 2, impl="reference")
    pre = md.prefill
    torch_sparse.minimax_m3_sparse_attn(
        t["query"][nd:], t["kv_cache"], t["topk"][:, nd:], pre.block_table, pre.cu_seqlens_q,
        pre.seq_lens, pre.context_lens, pre.max_query_len, 2, 0.1, out[nd:], impl="reference")
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4, sm_scale=0.1)
    ref = interop.reference_attention(spec, problem.query, problem.kv_cache,
                                      problem.topk_indices, problem.metadata)
    _assert_close(out, ref, "reference impl, seed calls")


# --- write_kv ----------------------------------------------------------------------------------

def _expected_cache(cache, key, value, slots, fp8_max, k_scale, v_scale):
    """What the cache must hold after the write (computed with plain indexing)."""
    expected = cache.clone()
    block_size = cache.shape[2]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        page, off = divmod(slot, block_size)
        for kv, new, scale in ((0, key[t], k_scale), (1, value[t], v_scale)):
            if fp8_max:
                new = new.float()
                if scale is not None:
                    per_slot = isinstance(scale, torch.Tensor) and scale.dim() == 2
                    new = new / (scale[:, slot, None] if per_slot else scale)
                new = new.clamp(-fp8_max, fp8_max)
            expected[page, kv, off] = new.to(cache.dtype)
    return expected


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache,scale_mode", [("auto", "none"), ("fp8_e4m3", "none"),
                                              ("fp8_e4m3", "per_slot"), ("fp8_e5m2", "scalar")])
def test_write_kv(rng, cache, scale_mode, layout, impl):
    """Round trip at the batch's slots; padding (-1) slots write nothing; FP8 saturates."""
    spec = _spec((8, 4), cache, layout)
    problem = random_problem(spec, [1, 3, 9], [129, 3, 300], rng, scale_mode=scale_mode,
                             num_tokens=16)
    t = _torch(problem)
    key = interop.to_torch(problem.key, DEVICE)
    value = interop.to_torch(problem.value, DEVICE)
    if spec.is_fp8:  # push some values past the FP8 range (scales are in [0.5, 2])
        key[::3] *= 1e5
        value[1::4] *= -1e5
    slots = t["metadata"].slot_mapping
    fp8_max = interop.FP8_MAX.get(str(t["kv_cache"].dtype).replace("torch.", ""), 0.0)
    expected = _expected_cache(t["kv_cache"], key, value, slots, fp8_max, t["k_scale"],
                               t["v_scale"])
    torch_sparse.write_kv(t["kv_cache"], key, value, slots, spec, t["k_scale"], t["v_scale"],
                          impl=impl)
    case = f"write_kv {cache}/{scale_mode}/{layout}/{impl}"
    assert (slots < 0).any(), case
    assert torch.equal(t["kv_cache"].float(), expected.float()), case
    if spec.is_fp8:
        assert t["kv_cache"].float().isfinite().all(), f"{case}: FP8 must saturate, not overflow"


def test_write_then_attend(rng):
    """write_kv's new K/V are what attention then reads (bf16 cache, HND)."""
    spec = _spec(layout="HND")
    problem = random_problem(spec, [1, 1, 20], [140, 300, 150], rng)
    t = _torch(problem)
    torch_sparse.write_kv(t["kv_cache"], interop.to_torch(problem.key, DEVICE),
                          interop.to_torch(problem.value, DEVICE), t["metadata"].slot_mapping,
                          spec)
    out = _run_sparse_attention(problem, kv_cache=t["kv_cache"])
    ref = interop.reference_attention(spec, problem.query, t["kv_cache"], problem.topk_indices,
                                      problem.metadata)
    _assert_close(out, ref, "write then attend")


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def no_launch(monkeypatch):
    """Any op call fails the test: errors must be raised before a launch."""
    def launched(*args, **kwargs):
        raise AssertionError("an op ran although its input is bad")
    for name in ("sparse_attn", "sparse_attn_decode", "write_kv"):
        monkeypatch.setattr(ops, name, launched)


def _decode_args(rng):
    problem = random_problem(_spec(), [1, 1], [200, 7], rng)
    t = _torch(problem)
    md = t["metadata"]
    return dict(q=t["query"], kv_cache=t["kv_cache"], topk_idx=t["topk"],
                block_table=md.block_table, seq_lens=md.seq_lens, num_kv_heads=2, sm_scale=0.1,
                output=torch.empty_like(t["query"]), decode_query_len=1)


BAD_DECODE = {
    "q float32": (TypeError, lambda a: dict(q=a["q"].float(), output=a["output"].float())),
    "q 2-D": (ValueError, lambda a: dict(q=a["q"][0])),
    "head_size 64": (ValueError, lambda a: dict(q=a["q"][..., :64], output=a["output"][..., :64])),
    "heads not a multiple": (ValueError, lambda a: dict(num_kv_heads=3)),
    "q strided head": (ValueError, lambda a: dict(
        q=torch.empty(a["q"].shape[:2] + (256,), dtype=a["q"].dtype, device=DEVICE)[..., ::2])),
    "cache kv heads": (ValueError, lambda a: dict(kv_cache=a["kv_cache"][:, :, :, :1])),
    "cache block size": (ValueError, lambda a: dict(kv_cache=a["kv_cache"][:, :, :64])),
    "cache float32": (TypeError, lambda a: dict(kv_cache=a["kv_cache"].float())),
    "topk float": (TypeError, lambda a: dict(topk_idx=a["topk_idx"].float())),
    "topk too few tokens": (ValueError, lambda a: dict(topk_idx=a["topk_idx"][:, :1])),
    "topk kv heads": (ValueError, lambda a: dict(topk_idx=a["topk_idx"][:1])),
    "block_table 1-D": (ValueError, lambda a: dict(block_table=a["block_table"][0])),
    "block_table on meta": (ValueError, lambda a: dict(block_table=a["block_table"].to("meta"))),
    "output shape": (ValueError, lambda a: dict(output=a["output"][:1])),
    "output dtype": (TypeError, lambda a: dict(output=a["output"].half())),
    "sm_scale": (ValueError, lambda a: dict(sm_scale=0.0)),
    "decode_query_len 0": (ValueError, lambda a: dict(decode_query_len=0)),
    "tokens != reqs * L": (ValueError, lambda a: dict(decode_query_len=2)),
    "seq_lens length": (ValueError, lambda a: dict(seq_lens=a["seq_lens"][:1])),
    "q not a tensor": (TypeError, lambda a: dict(q=a["q"].tolist())),
}


@pytest.mark.parametrize("case", list(BAD_DECODE))
def test_bad_decode_input_raises_before_launch(rng, no_launch, case):
    error, change = BAD_DECODE[case]
    args = _decode_args(rng)
    with pytest.raises(error):
        torch_sparse.minimax_m3_sparse_attn_decode(**{**args, **change(args)})


def _fp8_problem(rng):
    return random_problem(_spec(cache="fp8_e4m3"), [1, 5], [200, 9], rng, scale_mode="per_slot")


BAD_SCALES = {
    "shape": (ValueError, lambda s: s[:, :5]),
    "int tensor": (TypeError, lambda s: s.int()),
    "string": (TypeError, lambda s: "1.0"),
    "other device": (ValueError, lambda s: s.to("meta")),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_scales_raise(rng, no_launch, case):
    error, change = BAD_SCALES[case]
    problem = _fp8_problem(rng)
    t = _torch(problem)
    with pytest.raises(error):
        torch_sparse.sparse_attention(problem.spec, t["query"], t["kv_cache"], t["topk"],
                                      t["metadata"], k_scale=change(t["k_scale"]))
    with pytest.raises(error):
        torch_sparse.write_kv(t["kv_cache"], interop.to_torch(problem.key, DEVICE),
                              interop.to_torch(problem.value, DEVICE),
                              t["metadata"].slot_mapping, problem.spec,
                              v_scale=change(t["v_scale"]))


def test_bad_spec_metadata_and_prefill_input(rng, no_launch):
    problem = random_problem(_spec(), [1, 30], [200, 40], rng)
    t = _torch(problem)
    args = (t["query"], t["kv_cache"], t["topk"], t["metadata"])
    with pytest.raises(TypeError, match="fp8"):  # the cache does not hold the spec's dtype
        torch_sparse.sparse_attention(_spec(cache="fp8_e5m2"), *args)
    with pytest.raises(ValueError):
        torch_sparse.sparse_attention(_spec((16, 2)), *args)
    short = t["metadata"].replace(token_positions=t["metadata"].token_positions[:3])
    with pytest.raises(ValueError, match="token_positions"):
        torch_sparse.sparse_attention(problem.spec, *args[:3], short)
    with pytest.raises(ValueError, match="impl"):
        torch_sparse.sparse_attention(problem.spec, *args, impl="cuda")
    pre = t["metadata"].prefill
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        torch_sparse.minimax_m3_sparse_attn(
            t["query"], t["kv_cache"], t["topk"], pre.block_table, pre.cu_seqlens_q[:1],
            pre.seq_lens, pre.context_lens, 30, 2, 0.1, torch.empty_like(t["query"]))
    key = interop.to_torch(problem.key, DEVICE)
    slots = t["metadata"].slot_mapping
    for bad, error in ((dict(key=key.float()), TypeError), (dict(key=key[:, :1]), ValueError),
                       (dict(slot_mapping=slots.float()), TypeError),
                       (dict(slot_mapping=slots[:2]), ValueError),
                       (dict(kv_cache=t["kv_cache"][:, :, :, :1]), ValueError)):
        kwargs = dict(kv_cache=t["kv_cache"], key=key, value=key, slot_mapping=slots,
                      spec=problem.spec)
        with pytest.raises(error):
            torch_sparse.write_kv(**{**kwargs, **bad})


# --- backend classes ---------------------------------------------------------------------------

def test_backend_class_surface():
    backend = torch_sparse.MiniMaxM3SparseBackend
    assert backend.get_name() == "MINIMAX_M3_SPARSE"
    assert backend.is_sparse()
    assert backend.get_supported_head_sizes() == [128]
    assert backend.get_supported_kernel_block_sizes() == [128]
    assert backend.supported_dtypes == [torch.bfloat16, torch.float16]
    assert set(backend.supported_kv_cache_dtypes) == set(interop.CACHE_DTYPES)
    assert backend.get_kv_cache_shape(10, 128, 4, 128) == _spec((8, 4)).kv_cache_shape(10)
    assert backend.get_kv_cache_stride_order() == (0, 1, 2, 3, 4)
    assert backend.get_kv_cache_stride_order(kv_cache_layout="HND") == (0, 1, 3, 2, 4)
    assert backend.get_kv_cache_stride_order(True, "HND") == (0, 1, 2, 4, 3, 5)
    assert backend.get_impl_cls() is torch_sparse.MiniMaxM3SparseImpl
    assert backend.get_builder_cls() is torch_sparse.MiniMaxM3SparseMetadataBuilder


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_backend_forward_mixed_batch(rng, impl):
    """Builder + impl: flat [tokens, heads * head_size] rows with padding, FP8 cache with the
    layer's scales, speculative decodes; the top-k rows are sliced as the seed slices them."""
    spec = _spec((8, 2), "fp8_e4m3", "HND")
    query_lens, seq_lens = _mixed(2)
    problem = random_problem(spec, query_lens, seq_lens, rng, decode_query_len=2,
                             scale_mode="scalar", num_tokens=sum(query_lens) + 3, scatter=True,
                             future_fraction=0.2)
    t = _torch(problem)
    builder = torch_sparse.MiniMaxM3SparseMetadataBuilder(spec, DEVICE, decode_query_len=2)
    md = builder.build(query_lens, seq_lens, problem.metadata.block_table,
                       num_tokens=problem.metadata.num_tokens)
    assert torch.equal(md.token_positions, t["metadata"].token_positions)
    layer = type("Layer", (), {})()
    layer._k_scale = torch.tensor(problem.k_scale, device=DEVICE)
    layer._v_scale = torch.tensor(problem.v_scale, device=DEVICE)
    impl_obj = torch_sparse.MiniMaxM3SparseImpl(8, 128, spec.scale, 2, kv_cache_dtype="fp8_e4m3",
                                                kv_cache_layout="HND", topk_blocks=4, impl=impl)
    rows = md.num_actual_tokens
    query = t["query"].reshape(t["query"].shape[0], -1)
    output = torch.full_like(query, float("nan"))
    assert impl_obj.forward(layer, query, t["kv_cache"], t["topk"], md, output) is output
    assert not output[rows:].any(), "padding rows past num_tokens must be zeros"
    _assert_close(output.view(t["query"].shape), _reference(problem), f"backend {impl}", rows)
    assert impl_obj.forward(layer, query, t["kv_cache"], t["topk"], None, output) is output


# --- torch.library registration ----------------------------------------------------------------

def _op_args(rng, impl, decode):
    problem = random_problem(_spec(topk=2), [1, 1], [130, 9], rng, scale_mode="none")
    t = _torch(problem)
    md = t["metadata"]
    common = (t["query"], t["kv_cache"], t["topk"], md.block_table)
    if decode:
        return common + (md.seq_lens, torch.empty_like(t["query"]), 0.1, 1, None, None, impl)
    return common + (md.token_to_req, md.token_positions, torch.empty_like(t["query"]), 0.1,
                     None, None, impl)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("decode", [False, True], ids=["mapped", "decode"])
def test_opcheck(rng, impl, decode):
    """Schema, fake implementation and dispatch of the registered ops."""
    op = ops.sparse_attn_decode if decode else ops.sparse_attn
    torch.library.opcheck(op, _op_args(rng, impl, decode),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_opcheck_write_kv(rng):
    # A bf16 cache: opcheck's schema test multiplies tensors, which FP8 cannot on a CPU.
    problem = random_problem(_spec((8, 2)), [1, 2], [130, 9], rng)
    t = _torch(problem)
    args = (t["kv_cache"].clone(), interop.to_torch(problem.key, DEVICE),
            interop.to_torch(problem.value, DEVICE), t["metadata"].slot_mapping, 0.0, None,
            None, "reference")
    torch.library.opcheck(ops.write_kv, args)


class _DecodeLayer(torch.nn.Module):
    """What model code looks like: write this step's K/V, then attend."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def forward(self, q, k, v, kv_cache, topk, block_table, seq_lens, slots, impl):
        torch_sparse.write_kv(kv_cache, k, v, slots, self.spec, impl=impl)
        out = torch.empty_like(q)
        torch_sparse.minimax_m3_sparse_attn_decode(
            q * 1.0, kv_cache, topk, block_table, seq_lens, self.spec.num_kv_heads,
            self.spec.scale, out, 1, impl=impl)
        return out + 0.0


def _compiled_decode_case(rng, spec, backend, impl, seq_lens,
                          reference=interop.reference_attention):
    problem = random_problem(spec, [1] * len(seq_lens), seq_lens, rng, scatter=True)
    t = _torch(problem)
    md = t["metadata"]
    key = interop.to_torch(problem.key, DEVICE)
    value = interop.to_torch(problem.value, DEVICE)
    model = _DecodeLayer(spec)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    eager_cache = t["kv_cache"].clone()
    args = (t["query"], key, value, None, t["topk"], md.block_table, md.seq_lens,
            md.slot_mapping, impl)
    out = compiled(*args[:3], t["kv_cache"], *args[4:])
    expected = model(*args[:3], eager_cache, *args[4:])
    assert torch.equal(t["kv_cache"].float(), eager_cache.float()), "compiled write_kv differs"
    ref = reference(spec, problem.query, t["kv_cache"], problem.topk_indices, problem.metadata)
    _assert_close(out, ref, f"torch.compile({backend}) {impl}")
    _assert_close(expected, ref, f"eager {impl}")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_compile_fullgraph_traces_the_ops(rng, impl):
    """fullgraph=True through the AOT (fake tensor) pipeline, without Inductor's C++ step."""
    _compiled_decode_case(rng, _spec(), "aot_eager", impl, [130, 300])


# --- GPU: MiniMax-M3 shapes, CUDA graphs, Inductor ---------------------------------------------

# (num_heads, num_kv_heads, kv_cache_dtype, layout, scale_mode)
M3_CASES = [(64, 4, "auto", "NHD", "none"), (64, 4, "fp8_e4m3", "HND", "per_slot"),
            (16, 1, "auto", "HND", "none"), (16, 1, "fp8_e5m2", "NHD", "scalar")]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,cache,layout,scale_mode", M3_CASES)
def test_gpu_m3_shapes(rng, heads, kv_heads, cache, layout, scale_mode):
    """Decodes up to 32k tokens of context next to prefills with and without long contexts."""
    spec = _spec((heads, kv_heads), cache, layout, topk=16)
    problem = random_problem(spec, [1] * 4 + [200, 300], [32768, 2000, 129, 5, 32768, 300],
                             rng, scale_mode=scale_mode, scatter=True, future_fraction=0.2,
                             empty_fraction=0.01)
    out = _run_sparse_attention(problem)
    _assert_close(out, _device_reference(problem), f"gpu {heads}/{kv_heads} {cache}/{layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads,decode_query_len", [((64, 4), 1), ((16, 1), 2)])
def test_gpu_decode_cuda_graph(rng, heads, decode_query_len):
    """Capture one decode, then replay it on new queries and a new selection."""
    spec = _spec(heads, topk=16)
    lens = decode_query_len
    seq_lens = [32768, 4096, 129, 700, 9, 3000]
    problem = random_problem(spec, [lens] * 6, seq_lens, rng, decode_query_len=lens,
                             scatter=True)
    t = _torch(problem)
    md = t["metadata"]
    q, topk = t["query"].clone(), t["topk"].clone()
    out = torch.full_like(q, float("nan"))

    def step():
        torch_sparse.minimax_m3_sparse_attn_decode(
            q, t["kv_cache"], topk, md.decode.block_table, md.decode.seq_lens, heads[1],
            spec.scale, out, lens)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(2):
        # Same batch (positions), fresh queries and selection on every replay.
        query = rng.standard_normal(problem.query.shape).astype(problem.query.dtype)
        selection = make_topk(problem.metadata, heads[1], 16, rng,
                                              scatter=True)
        q.copy_(interop.to_torch(query, DEVICE))
        topk.copy_(interop.to_torch(selection, DEVICE))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = torch_reference(spec, query, t["kv_cache"], selection, problem.metadata)
        _assert_close(out, ref, f"cuda graph replay {replay} {heads} L={lens}")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor(rng):
    _compiled_decode_case(rng, _spec((64, 4), topk=16), "inductor", "triton",
                          [32768, 4096, 129, 700], reference=torch_reference)
