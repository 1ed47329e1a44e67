"""torch_sparse.index_topk (the fused Triton scorer + top-k, interpreted on a CPU; its split
and merge for decode) and write_index_k against the float64 reference: exact rows (order and
ties included) on small-integer data, near-ties only on normal data; mixed decode-first
batches, speculative decode, padding tokens and requests, NaN in unvisited slots, FP8 caches,
outputs poisoned before the kernels run, bad inputs, torch.compile, and (gpu) M3 shapes and
CUDA-graph capture."""
import numpy as np
import pytest

import interop
from interop.indexer import IndexerSpec

from tests.compiled import run_without_interpreter

from .indexer_cases import (assert_topk_equal, expected_after_write, random_index_problem,
                            write_case)

torch = pytest.importorskip("torch")
import triton  # noqa: E402

import torch_sparse  # noqa: E402
from torch_sparse import indexer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CACHE_DTYPES = [("auto", "bfloat16"), ("auto", "float16"), ("fp8_e4m3", "bfloat16")]
POISON = 12345  # never a block id of these batches


def _torch(prob):
    return (interop.to_torch(prob.index_query, DEVICE), interop.to_torch(prob.index_cache, DEVICE),
            interop.to_torch(prob.metadata, DEVICE))


def _run(prob, **kw):
    q, cache, md = _torch(prob)
    out = torch.full(prob.ispec.topk_shape(q.shape[0]), POISON, dtype=torch.int32, device=DEVICE)
    got = torch_sparse.index_topk(prob.ispec, q, cache, md, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and got.shape == out.shape
    ref, scores = interop.reference_index_topk(prob.ispec, prob.index_query, prob.index_cache,
                                               prob.metadata)
    return got.cpu().numpy(), ref, scores


@pytest.mark.parametrize("heads, cache_dtype, query_dtype",
                         [(4, *c) for c in CACHE_DTYPES] + [(1, "auto", "bfloat16")])
def test_mixed_batch_matches_reference(rng, heads, cache_dtype, query_dtype):
    ispec = IndexerSpec(heads, topk_blocks=4, index_cache_dtype=cache_dtype)
    # Two decodes (split over blocks, then merged), then prefills (one crossing a block
    # boundary), two padding tokens.
    prob = random_index_problem(ispec, [1, 1, 6, 3], [1100, 130, 262, 700], rng,
                                query_dtype=query_dtype, num_tokens=13)
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, f"{cache_dtype} {query_dtype} {heads}")
    assert (out[:, 11:] == -1).all()


def test_normal_values_forced_blocks_speculative_decode(rng):
    ispec = IndexerSpec(2, topk_blocks=5, init_blocks=1, local_blocks=2)
    prob = random_index_problem(ispec, [2, 2, 4], [900, 300, 1030], rng, decode_query_len=2,
                                values="normal")
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, "normal", tol=1e-3)
    assert (out[..., 0] == 0).all()  # the init block leads every row


def test_long_prefill_rows_and_many_ties(rng):
    # One prefill of 40 tokens (three tiles of 16 tokens x 4 heads), 20 blocks to rank on
    # {-1, 0, 1} queries: equal block maxima everywhere.
    ispec = IndexerSpec(4, topk_blocks=8)
    prob = random_index_problem(ispec, [40], [2560], rng)
    prob.index_query[:] = np.sign(prob.index_query.astype(np.float32)).astype(
        prob.index_query.dtype)
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, "ties")


def test_nan_in_a_seen_key_ranks_its_block_last(rng):
    ispec = IndexerSpec(1, topk_blocks=8, local_blocks=0)
    prob = random_index_problem(ispec, [2], [700], rng)
    page = prob.metadata.block_table[0, 2]
    prob.index_cache[page, 5] = np.nan  # seen by both tokens (positions 698, 699)
    out, ref, scores = _run(prob)
    assert np.isnan(scores[:, :, 2]).all() and (ref[..., 5] == 2).all()
    assert_topk_equal(out, ref, scores, "nan")


def test_padding_requests_and_short_rows(rng):
    ispec = IndexerSpec(4, topk_blocks=6)
    prob = random_index_problem(ispec, [1, 3], [200, 3], rng, num_tokens=6, num_reqs=4)
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, "padding")
    assert (out[:, 0, 2:] == -1).all() and (out[:, 1:4, 1:] == -1).all()
    assert (out[:, 4:] == -1).all()


def test_out_buffer_larger_than_the_batch(rng):
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [1, 3], [300, 140], rng)
    q, cache, md = _torch(prob)
    buf = torch.full((2, 9, 4), POISON, dtype=torch.int32, device=DEVICE)
    got = torch_sparse.index_topk(ispec, q, cache, md, out=buf)
    ref, _ = interop.reference_index_topk(ispec, prob.index_query, prob.index_cache,
                                          prob.metadata)
    np.testing.assert_array_equal(got.cpu().numpy(), ref)
    assert (buf[:, 4:] == POISON).all()  # rows past the batch untouched


def test_compile_fullgraph_traces_the_ops(rng):
    """fullgraph=True through the AOT (fake tensor) pipeline: write the keys, then select."""
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [1, 3], [300, 140], rng)
    q, cache, md = _torch(prob)
    key = interop.to_torch(prob.index_key, DEVICE)

    def step(q, key, cache, slots):
        torch_sparse.write_index_k(cache, key, slots, ispec)
        return torch_sparse.index_topk(ispec, q * 1, cache, md)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_cache = cache.clone()
    got = compiled(q, key, cache, md.slot_mapping)
    expected = step(q, key, eager_cache, md.slot_mapping)
    torch.testing.assert_close(cache, eager_cache, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- write_index_k

@pytest.mark.parametrize("cache_dtype, query_dtype", CACHE_DTYPES + [("fp8_e5m2", "float16")])
def test_write_index_k(rng, cache_dtype, query_dtype):
    ispec = IndexerSpec(1, index_cache_dtype=cache_dtype)
    prob, key, slots = write_case(ispec, query_dtype, rng)
    cache = interop.to_torch(prob.index_cache, DEVICE)
    torch_sparse.write_index_k(cache, interop.to_torch(key, DEVICE),
                               torch.from_numpy(slots).to(DEVICE), ispec)
    np.testing.assert_array_equal(cache.float().cpu().numpy(),
                                  expected_after_write(prob.index_cache, key, slots))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, error, words", [
    (dict(query_dtype=torch.float32), TypeError, "index_query has dtype torch.float32"),
    (dict(cache_dtype=torch.float16), TypeError, "index_cache has dtype torch.float16"),
    (dict(query_heads=3), ValueError, "index_query shape"),
    (dict(cache_shape=(4, 128, 64)), ValueError, "index_cache shape"),
    (dict(tokens=40), ValueError, "metadata.token_positions has 5 entries"),
    (dict(out_dtype=torch.int64), TypeError, "out has dtype torch.int64"),
    (dict(out_shape=(2, 5, 3)), ValueError, "out shape"),
    (dict(numpy_query=True), TypeError, "index_query must be a torch.Tensor"),
])
def test_index_topk_rejects(rng, change, error, words):
    ispec = IndexerSpec(2, topk_blocks=4)
    prob = random_index_problem(ispec, [1, 4], [300, 130], rng)
    q, cache, md = _torch(prob)
    if "query_dtype" in change:
        q = q.to(change["query_dtype"])
    if "query_heads" in change:
        q = torch.ones((q.shape[0], change["query_heads"], 128), dtype=q.dtype, device=DEVICE)
    if "tokens" in change:
        q = torch.ones((change["tokens"], 2, 128), dtype=q.dtype, device=DEVICE)
    if "numpy_query" in change:
        q = prob.index_query
    if "cache_dtype" in change:
        cache = cache.to(change["cache_dtype"])
    if "cache_shape" in change:
        cache = torch.ones(change["cache_shape"], dtype=cache.dtype, device=DEVICE)
    out = None
    if "out_dtype" in change:
        out = torch.zeros((2, 5, 4), dtype=change["out_dtype"], device=DEVICE)
    if "out_shape" in change:
        out = torch.zeros(change["out_shape"], dtype=torch.int32, device=DEVICE)
    with pytest.raises(error, match=words):
        torch_sparse.index_topk(ispec, q, cache, md, out=out)


@pytest.mark.parametrize("change, error, words", [
    (dict(key_dtype=torch.float32), TypeError, "index_key has dtype torch.float32"),
    (dict(cache_dtype=torch.float16), TypeError, "index_cache has dtype torch.float16"),
    (dict(key_shape=(2, 64)), ValueError, "index_key shape"),
    (dict(slots=[1]), ValueError, "slot_mapping has 1 entries"),
    (dict(slots=[1.0, 2.0]), TypeError, "slot_mapping has dtype torch.float32"),
])
def test_write_index_k_rejects(change, error, words):
    cache = torch.ones((3, 128, 128), dtype=torch.bfloat16, device=DEVICE)
    key = torch.ones(change.get("key_shape", (2, 128)), device=DEVICE,
                     dtype=change.get("key_dtype", torch.bfloat16))
    cache = cache.to(change.get("cache_dtype", torch.bfloat16))
    slots = torch.tensor(change.get("slots", [0, 1]), device=DEVICE)
    with pytest.raises(error, match=words):
        torch_sparse.write_index_k(cache, key, slots, IndexerSpec(1))


# ---------------------------------------------------------------- GPU: M3 shapes, CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("heads", [4, 1])
def test_gpu_m3_shapes(rng, heads):
    """Decodes up to 32k tokens of context next to prefills of 1k and 3k tokens."""
    ispec = IndexerSpec(heads)
    prob = random_index_problem(ispec, [1] * 6 + [1024, 3000], [32768, 20000, 4096, 129, 700, 9,
                                                                 9000, 3000], rng)
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, f"gpu heads {heads}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, decode_query_len", [(4, 1), (1, 2)])
def test_gpu_decode_cuda_graph(rng, heads, decode_query_len):
    """Capture one decode step, then replay it on fresh queries."""
    ispec = IndexerSpec(heads)
    lens = decode_query_len
    prob = random_index_problem(ispec, [lens] * 5, [32768, 4096, 129, 700, 3000], rng,
                                decode_query_len=lens)
    q, cache, md = _torch(prob)
    out = torch.full(ispec.topk_shape(q.shape[0]), POISON, dtype=torch.int32, device=DEVICE)
    torch_sparse.index_topk(ispec, q, cache, md, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch_sparse.index_topk(ispec, q, cache, md, out=out)
    for replay in range(2):
        query = rng.integers(-2, 3, prob.index_query.shape).astype(prob.index_query.dtype)
        q.copy_(interop.to_torch(query, DEVICE))
        out.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        ref, scores = interop.reference_index_topk(ispec, query, prob.index_cache, prob.metadata)
        assert_topk_equal(out.cpu().numpy(), ref, scores, f"replay {replay}")


def test_split_merge_workspace_is_used(rng, monkeypatch):
    """A decode of one request splits its blocks (then merges): the rows match the unsplit."""
    ispec = IndexerSpec(4, topk_blocks=4)
    prob = random_index_problem(ispec, [1], [2000], rng)
    assert interop.tiling.index_num_splits(1, prob.metadata.block_table.shape[1]) > 1
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, "split decode")
    monkeypatch.setattr(indexer, "index_num_splits", lambda tiles, blocks: 1)
    out1, _, _ = _run(prob)
    np.testing.assert_array_equal(out1, out)


def test_split_ranges_keep_fewer_slots_than_the_topk(rng):
    """Decodes whose block ranges are shorter than the top-k keep fewer candidates per split
    (`index_split_slots`); the merge still finds the reference's rows, ties included."""
    ispec = IndexerSpec(4, topk_blocks=16)
    prob = random_index_problem(ispec, [1, 1], [5000, 4000], rng)
    max_blocks = prob.metadata.block_table.shape[1]
    splits = interop.tiling.index_num_splits(2, max_blocks)
    assert 1 < interop.tiling.index_split_slots(16, max_blocks, splits) < 16
    out, ref, scores = _run(prob)
    assert_topk_equal(out, ref, scores, f"{splits} splits")


def _compile_index_kernels_for_sm90():
    """Compile the scoring kernel (unsplit with an FP8 cache, split with bf16) and the merge
    for sm_90; print one line per kernel."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ("first_req first_token max_blocks num_blocks stride_qt stride_qh stride_cb "
            "stride_ct stride_tr stride_oh stride_ot stride_ps stride_ph stride_pt").split()
    target = GPUTarget("cuda", 90, 32)
    for heads, tokens, cache, splits, slots in ((1, 64, "fp8e4nv", 1, 16), (4, 1, "bf16", 16, 16),
                                                (4, 1, "bf16", 128, 4)):
        signature = dict(q_ptr="*bf16", cache_ptr=f"*{cache}", table_ptr="*i32", qsl_ptr="*i32",
                         pos_ptr="*i32", out_ptr="*i32",
                         part_ptr="*i64" if splits > 1 else "*i32", **dict.fromkeys(ints, "i32"))
        constexprs = dict(HEADS=heads, HEADS_PAD=heads, TILE_TOKENS=tokens,
                          ROWS=max(16, tokens * heads), HEAD_SIZE=128, BLOCK_SIZE=128, TOPK=16,
                          SLOTS=slots, INIT_BLOCKS=0, LOCAL_BLOCKS=1, SPLITS=splits,
                          SPLIT_BLOCKS=1, DOT_DTYPE=tl.bfloat16, INTERPRETED=False)
        compiled = triton.compile(ASTSource(indexer._index_topk_kernel, signature, constexprs),
                                  target=target, options=dict(num_warps=4, num_stages=2))
        print("score", heads, tokens, cache, splits, compiled.metadata.num_warps)
    ints = "first_token stride_ps stride_ph stride_pt stride_oh stride_ot".split()
    signature = dict(part_ptr="*i64", out_ptr="*i32", **dict.fromkeys(ints, "i32"))
    constexprs = dict(SPLITS=128, PART_SLOTS=4, TOPK=16, SLOTS=16)  # batch 1 at 32k tokens
    triton.compile(ASTSource(indexer._merge_kernel, signature, constexprs), target=target,
                   options=dict(num_warps=4))
    print("merge")


def test_index_kernels_compile_for_sm90():
    """Compiled (not interpreted), in a child process: every kernel variant lowers for sm_90."""
    lines = run_without_interpreter("test_torch_indexer", "_compile_index_kernels_for_sm90")
    assert len(lines) == 4 and lines[-1] == "merge", lines
