"""The framework-neutral core: spec validation, the metadata builder, validate_topk, and the
float64 reference against an independent brute-force dense masked softmax."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import interop
from interop.testing import make_topk, random_block_table, random_problem

BS = 128


# ---------------------------------------------------------------- spec

def test_spec_shapes_and_stride_orders():
    spec = interop.SparseAttentionSpec(64, 4)
    assert spec.num_queries_per_kv == 16
    assert spec.scale == pytest.approx(128 ** -0.5)
    assert spec.kv_cache_shape(10) == (10, 2, 128, 4, 128)
    assert spec.physical_kv_cache_shape(10) == (10, 2, 128, 4, 128)
    hnd = interop.SparseAttentionSpec(64, 4, kv_cache_layout="HND", sm_scale=0.5)
    assert hnd.kv_cache_stride_order() == (0, 1, 3, 2, 4)
    assert hnd.physical_kv_cache_shape(10) == (10, 2, 4, 128, 128)
    assert hnd.scale == 0.5
    assert interop.SparseAttentionSpec(8, 2, kv_cache_dtype="fp8").cache_storage_dtype(
        "bfloat16") == "float8_e4m3fn"
    assert interop.SparseAttentionSpec(8, 2).cache_storage_dtype("float16") == "float16"


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_heads=6, num_kv_heads=4), ["num_heads (6)", "num_kv_heads (4)"]),
    (dict(num_heads=8, num_kv_heads=2, head_size=64), ["head_size", "64", "128"]),
    (dict(num_heads=8, num_kv_heads=2, block_size=64), ["block_size", "64", "128"]),
    (dict(num_heads=8, num_kv_heads=2, kv_cache_dtype="int8"), ["kv_cache_dtype", "int8", "fp8_e5m2"]),
    (dict(num_heads=8, num_kv_heads=2, kv_cache_layout="HDN"), ["kv_cache_layout", "HDN", "HND"]),
    (dict(num_heads=0, num_kv_heads=2), ["num_heads", "0"]),
    (dict(num_heads=8, num_kv_heads=2, sm_scale=-1.0), ["sm_scale", "-1.0"]),
])
def test_spec_rejects(kwargs, words):
    with pytest.raises(ValueError) as err:
        interop.SparseAttentionSpec(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_spec_is_hashable_static():
    a = interop.SparseAttentionSpec(64, 4)
    assert hash(a) == hash(interop.SparseAttentionSpec(64, 4)) and a == interop.SparseAttentionSpec(64, 4)


# ---------------------------------------------------------------- builder

def test_build_metadata_decode_first_example():
    q = [1, 1, 5, 3]
    s = [300, 129, 5, 260]
    table, nb = random_block_table(s, np.random.default_rng(0))
    md = interop.build_metadata(q, s, table, num_blocks=nb)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills, md.num_prefill_tokens) == (2, 2, 2, 8)
    assert md.num_actual_tokens == 10 and md.max_seq_len == 300
    np.testing.assert_array_equal(md.decode.seq_lens, [300, 129])
    np.testing.assert_array_equal(md.prefill.cu_seqlens_q, [0, 5, 8])
    np.testing.assert_array_equal(md.prefill.cu_seqlens_k, [0, 5, 265])
    np.testing.assert_array_equal(md.prefill.context_lens, [0, 257])
    assert md.prefill.max_query_len == 5 and md.prefill.max_seq_len == 260
    assert md.prefill.total_kv_blocks == 1 + 3
    np.testing.assert_array_equal(md.token_positions, [299, 128, 0, 1, 2, 3, 4, 257, 258, 259])
    assert md.slot_mapping.dtype == np.int64 and md.seq_lens.dtype == np.int32
    assert md.slot_mapping[0] == table[0, 2] * BS + 43


def test_build_metadata_speculative_decode_and_padding():
    q, s = [2, 2, 7], [140, 2, 7]
    table, nb = random_block_table(s, np.random.default_rng(1))
    md = interop.build_metadata(q, s, table, decode_query_len=2, num_tokens=16)
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (2, 4, 1)
    assert md.num_tokens == 16 and md.num_actual_tokens == 11
    np.testing.assert_array_equal(md.token_positions[:4], [138, 139, 0, 1])
    assert (md.token_positions[11:] == -1).all() and (md.slot_mapping[11:] == -1).all()
    # A later request with the decode length is a prefill: decodes are the leading run only.
    md2 = interop.build_metadata([1, 3, 1], [10, 3, 4], random_block_table([10, 3, 4], np.random.default_rng(2))[0])
    assert (md2.num_decodes, md2.num_prefills, md2.num_prefill_tokens) == (1, 2, 4)
    assert md2.decode is not None and interop.build_metadata([3], [3], [[0]]).decode is None


@pytest.mark.parametrize("args, kwargs, words", [
    (([1, 2], [5], [[0], [1]]), {}, ["query_lens has 2", "seq_lens has 1"]),
    (([6], [5], [[0]]), {}, ["query_lens[0] = 6", "seq_lens[0] = 5"]),
    (([1], [-3], [[0]]), {}, ["seq_lens[0] = -3", "negative"]),
    (([-1], [3], [[0]]), {}, ["query_lens[0] = -1"]),
    (([1], [300], [[0, 1]]), {}, ["seq_lens[0] = 300", "3 blocks", "hold 2"]),
    (([1], [200], [[0, 7]]), {"num_blocks": 5}, ["block_table[0, 1] = 7", "[0, 5)"]),
    (([1], [200], [[0, -1]]), {}, ["block_table[0, 1] = -1", "negative"]),
    (([1], [2], [[0], [1]]), {}, ["block_table shape (2, 1)", "[1 requests"]),
    (([1], [2], [[0]]), {"block_size": 64}, ["block_size 64"]),
    (([1], [2], [[0]]), {"decode_query_len": 0}, ["decode_query_len", "0"]),
    (([3], [3], [[0]]), {"num_tokens": 2}, ["num_tokens (2)", "3"]),
])
def test_build_metadata_rejects(args, kwargs, words):
    with pytest.raises(ValueError) as err:
        interop.build_metadata(*args, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@st.composite
def batches(draw):
    n = draw(st.integers(0, 6))
    L = draw(st.integers(1, 3))
    ndec = draw(st.integers(0, n))
    q, s = [], []
    for i in range(n):
        ql = L if i < ndec else draw(st.integers(0, 300))
        q.append(ql)
        s.append(ql + draw(st.integers(0, 700)))
    return q, s, L, draw(st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_build_metadata_properties(batch):
    q, s, L, pad = batch
    table, nb = random_block_table(s, np.random.default_rng(len(q)))
    md = interop.build_metadata(q, s, table, decode_query_len=L, num_blocks=nb,
                                num_tokens=sum(q) + pad)
    q, s = np.array(q, np.int64), np.array(s, np.int64)
    # Decode-first split: the leading run of length-L requests.
    nd = md.num_decodes
    assert (q[:nd] == L).all() and (nd == len(q) or q[nd] != L)
    assert md.num_decode_tokens == nd * L and md.num_prefills == len(q) - nd
    assert md.num_decode_tokens + md.num_prefill_tokens == md.num_actual_tokens == q.sum()
    # Offsets consistent.
    np.testing.assert_array_equal(np.diff(md.query_start_loc), q)
    np.testing.assert_array_equal(np.diff(md.seq_start_loc), s)
    np.testing.assert_array_equal(md.context_lens, s - q)
    if md.prefill is not None:
        assert md.prefill.cu_seqlens_q[0] == 0 and md.prefill.cu_seqlens_k[0] == 0
        np.testing.assert_array_equal(np.diff(md.prefill.cu_seqlens_q), q[nd:])
        np.testing.assert_array_equal(np.diff(md.prefill.cu_seqlens_k), s[nd:])
        assert md.prefill.total_kv_blocks == int((-(-s[nd:] // BS)).sum())
    # Slots map every token to its page and offset; padding writes nothing.
    for t in range(md.num_tokens):
        slot = md.slot_mapping[t]
        if t >= md.num_actual_tokens:
            assert slot == -1 and md.token_positions[t] == -1
            continue
        r, p = md.token_to_req[t], md.token_positions[t]
        assert md.query_start_loc[r] <= t < md.query_start_loc[r + 1]
        assert p == s[r] - q[r] + (t - md.query_start_loc[r])
        assert slot // BS == table[r, p // BS] and slot % BS == p % BS
    live = md.slot_mapping[:md.num_actual_tokens]
    assert len(np.unique(live)) == live.size


# ---------------------------------------------------------------- validate_topk

def test_validate_topk_reports_rows():
    md = interop.build_metadata([1, 2], [300, 130], random_block_table([300, 130], np.random.default_rng(0))[0])
    topk = np.array([[[2, 0, -1], [1, 1, -1], [-1, -1, -1]],
                     [[0, 3, -1], [5, 0, 1], [-7, 1, -1]]], np.int32)
    rep = interop.validate_topk(topk, md)
    assert rep.duplicates == [(0, 1)]
    assert rep.out_of_range == [(1, 0), (1, 1)]
    assert rep.empty_rows == [(0, 2)] and not rep.ok
    with pytest.raises(ValueError, match="duplicates"):
        interop.validate_topk(topk, md, strict=True)
    good = make_topk(md, 2, 3, np.random.default_rng(1), scatter=True)
    assert interop.validate_topk(good, md).ok


# ---------------------------------------------------------------- reference

def brute_force(spec, q, cache_logical, topk, md, ks, vs):
    """Dense masked softmax, one (token, head) at a time, written apart from the reference."""
    q = q.astype(np.float64)
    out = np.zeros(q.shape)
    T = q.shape[0]
    nb = cache_logical.shape[0]
    for t in range(T):
        p = int(md.token_positions[t])
        if p < 0:
            continue
        r = int(md.token_to_req[t])
        for g in range(spec.num_kv_heads):
            chosen = {int(b) for b in topk[g, t] if 0 <= b <= p // BS}
            keys, vals = [], []
            for j in range(p + 1):
                if j // BS in chosen:
                    page = int(md.block_table[r, j // BS])
                    slot = page * BS + j % BS
                    keys.append(cache_logical[page, 0, j % BS, g] * ks[g, slot])
                    vals.append(cache_logical[page, 1, j % BS, g] * vs[g, slot])
            if not keys:
                continue
            K, V = np.array(keys), np.array(vals)
            for h in range(g * spec.num_queries_per_kv, (g + 1) * spec.num_queries_per_kv):
                logits = spec.scale * K @ q[t, h]
                w = np.exp(logits - logits.max())
                out[t, h] = (w / w.sum()) @ V
    return out


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache_dtype, scale_mode", [
    ("auto", "none"), ("fp8_e4m3", "none"), ("fp8_e4m3", "scalar"), ("fp8_e5m2", "per_slot")])
@pytest.mark.parametrize("heads", [(4, 1), (8, 2)])
def test_reference_matches_brute_force(rng, layout, cache_dtype, scale_mode, heads):
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=4, kv_cache_dtype=cache_dtype,
                                       kv_cache_layout=layout, sm_scale=0.07)
    p = random_problem(spec, [2, 2, 5, 3], [260, 130, 5, 520], rng, decode_query_len=2,
                       scale_mode=scale_mode, num_tokens=14, scatter=True,
                       future_fraction=0.5, empty_fraction=0.1)
    # A repeated entry counts once.
    p.topk_indices[0, 0, :2] = p.topk_indices[0, 0, 0]
    ref = interop.reference_attention(spec, p.query, p.kv_cache, p.topk_indices, p.metadata,
                                      p.k_scale, p.v_scale)
    logical = np.transpose(p.kv_cache.astype(np.float64), np.argsort(spec.kv_cache_stride_order()))
    nslots = logical.shape[0] * BS
    if scale_mode == "none":
        ks = vs = np.ones((spec.num_kv_heads, nslots))
    elif scale_mode == "scalar":
        ks, vs = np.full((spec.num_kv_heads, nslots), p.k_scale), np.full((spec.num_kv_heads, nslots), p.v_scale)
    else:
        ks, vs = p.k_scale.astype(np.float64), p.v_scale.astype(np.float64)
    dense = brute_force(spec, p.query, logical, p.topk_indices, p.metadata, ks, vs)
    err = np.abs(ref - dense).max()
    assert err < 1e-12, f"{layout} {cache_dtype} {scale_mode} {heads}: max abs diff {err:.3g}"
    # Padding tokens and tokens with an empty row are exact zeros.
    assert (ref[12:] == 0).all()


def test_reference_reads_torch_logical_view(rng):
    torch = pytest.importorskip("torch")
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=3, kv_cache_layout="HND")
    p = random_problem(spec, [1, 4], [200, 4], rng)
    view = interop.kv_cache_to_torch(p.kv_cache, spec)
    assert isinstance(view, torch.Tensor) and tuple(view.shape) == spec.kv_cache_shape(p.kv_cache.shape[0])
    a = interop.reference_attention(spec, p.query, p.kv_cache, p.topk_indices, p.metadata)
    b = interop.reference_attention(spec, interop.to_torch(p.query), view, p.topk_indices,
                                    interop.to_torch(p.metadata))
    np.testing.assert_array_equal(a, b)


def test_reference_rejects_mismatched_inputs(rng):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=3)
    p = random_problem(spec, [1], [10], rng)
    with pytest.raises(ValueError, match="query shape"):
        interop.reference_attention(spec, p.query[:, :4], p.kv_cache, p.topk_indices, p.metadata)
    with pytest.raises(ValueError, match="kv_cache shape"):
        interop.reference_attention(spec, p.query, p.kv_cache[:, :, :64], p.topk_indices, p.metadata)
    with pytest.raises(ValueError, match="topk_indices shape"):
        interop.reference_attention(spec, p.query, p.kv_cache, p.topk_indices[:, :, :2], p.metadata)
    fp8 = interop.SparseAttentionSpec(8, 2, topk_blocks=3, kv_cache_dtype="fp8")
    cache = p.kv_cache.astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale shape"):
        interop.reference_attention(fp8, p.query, cache, p.topk_indices, p.metadata,
                                    k_scale=np.ones((3, 5), np.float32))


def test_both_front_ends_take_their_tiling_from_interop():
    """One home for the arithmetic both front ends use (interop.tiling): tile shapes, chunk
    sizes, work bounds and the "auto" token threshold are the same objects in both."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax_sparse.dispatch
    import jax_sparse.union
    import torch_sparse.dispatch
    import torch_sparse.union
    from interop import tiling
    for module in (torch_sparse.union, jax_sparse.union):
        assert module.tile_tokens is tiling.union_tile_tokens
        assert module.tokens_per_chunk is tiling.union_tokens_per_chunk
    assert torch_sparse.dispatch.PREFILL_RULE.union_min_tokens == tiling.UNION_MIN_TOKENS
    assert jax_sparse.dispatch.UNION_MIN_TOKENS == tiling.UNION_MIN_TOKENS
    assert [tiling.k2q_tile_shape(g) for g in (1, 4, 16, 128)] == [(1, 64), (4, 16), (16, 4),
                                                                     (128, 1)]
    assert tiling.max_k2q_items(1, 0, 16, 8, 1, 1, 8) == 1
