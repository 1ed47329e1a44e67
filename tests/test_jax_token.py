"""jax_sparse: the Pallas kernels (interpret mode on CPU, Triton on a GPU) and the XLA
implementation against the float64 reference; jit behaviour; bad input; write_kv."""
import numpy as np
import pytest

import interop
from interop.testing import matching_query_dtype, poison_unused_slots
from tests.helpers import DECODE_BATCHES, JAX_ROWS, MIXED_BATCHES, row_id
from tests.helpers import check as _check
from tests.helpers import garbage_block_table
from tests.helpers import garbage_topk as _garbage_topk
from tests.helpers import jax_device_reference as _device_reference
from tests.helpers import jax_run as _run
from tests.helpers import jax_scales as _scales
from tests.helpers import problem as _problem
from tests.helpers import reference as _reference
from tests.helpers import same_shape_batches as _same_shape_batches

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_sparse  # noqa: E402

IMPLS = ["pallas", "xla"]
ON_GPU = jax.default_backend() == "gpu"
jax_on_gpu = pytest.mark.skipif(not ON_GPU, reason="needs JAX on a GPU")


# --- parity with the float64 reference -------------------------------------------------------

def _run_packed(problem, interpret=None):
    """The Pallas kernel with the FP8 cache handed over as uint16 pairs (the path caches past
    2^31 elements take), on a cache small enough for a test."""
    md = interop.to_jax(problem.metadata)
    k_scale, v_scale = _scales(problem)
    k_scale, v_scale = (None if s is None else s.reshape(-1) if s.ndim < 2 else s
                        for s in (k_scale, v_scale))
    return jax_sparse.paged_sparse_attention(
        problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
        jnp.asarray(problem.topk_indices), md.token_to_req, md.token_positions, md.block_table,
        k_scale, v_scale, force_packed=True, interpret=interpret)


@pytest.mark.parametrize("cache, layout, heads, scale_mode, decode_query_len, num_splits",
                         JAX_ROWS, ids=[row_id(r) for r in JAX_ROWS])
def test_parity_mixed_batch(rng, cache, layout, heads, scale_mode, decode_query_len,
                            num_splits):
    """Both implementations on one mixed batch (decodes of 1 or 2 tokens, prefill chunks,
    padding, sentinels anywhere in a row, future blocks, empty rows); the Pallas kernel with
    the row's split count and, for FP8 caches with scales, also on the cache as uint16 pairs
    (the path caches past 2^31 elements take)."""
    problem = _problem(rng, cache, layout, heads, scale_mode=scale_mode,
                       decode_query_len=decode_query_len, scatter=True, future_fraction=0.4,
                       empty_fraction=0.1)
    ref = _reference(problem)
    label = f"{cache} {layout} {heads} scales={scale_mode} L={decode_query_len}"
    _check(_run(problem, "pallas", num_splits=num_splits), ref,
           f"pallas num_splits={num_splits} {label}")
    _check(_run(problem, "xla"), ref, f"xla {label}")
    if scale_mode != "none":
        _check(_run_packed(problem), ref, f"pallas packed {label}")


def test_needs_packing_only_past_32_bit_offsets():
    from jax_sparse.pages import needs_packing
    page = (2, 128, 4, 128)  # 2^17 elements a page at 64/4 heads
    fp8 = jnp.float8_e4m3fn
    assert not needs_packing((2**14, *page), fp8)            # 2^31 elements: offsets < 2^31
    assert needs_packing((2**14 + 1, *page), fp8)            # past 2^31
    assert needs_packing((3 * 2**14, *page), fp8)            # past 2^32 bytes as well
    assert not needs_packing((3 * 2**14, *page), jnp.bfloat16)  # 2-byte: Pallas goes 64-bit


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, packed", [
    ("auto", False), ("float16", False), ("fp8_e4m3", False), ("fp8_e5m2", False),
    ("fp8_e4m3", True), ("fp8_e5m2", True)])
def test_pallas_lowers_for_cuda(layout, cache, packed):
    """The kernel lowers through Pallas' Triton backend for CUDA (no GPU needed to check)."""
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    query_dtype = matching_query_dtype(cache)
    storage = spec.cache_storage_dtype(query_dtype)
    sds = jax.ShapeDtypeStruct
    i32 = jnp.int32
    scale = sds((4, 40 * 128), jnp.float32) if cache.startswith("fp8") else None
    args = (sds((8, 64, 128), query_dtype), sds(spec.physical_kv_cache_shape(40), storage),
            sds((4, 8, 16), i32), sds((8,), i32), sds((8,), i32), sds((2, 20), i32),
            scale, scale)

    def call(*a):
        return jax_sparse.paged_sparse_attention(spec, *a, interpret=False,
                                                 force_packed=packed)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower(), "no Triton kernel in the CUDA lowering"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows_and_padding_give_zeros(rng, impl):
    problem = _problem(rng, empty_fraction=1.0)
    out = np.asarray(_run(problem, impl), np.float64)
    assert np.isfinite(out).all() and not out.any(), f"{impl}: rows with no entry not zeros"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cache, scale_mode", [("auto", "none"), ("fp8_e4m3", "per_slot")])
def test_nan_outside_attended_keys_is_ignored(rng, impl, cache, scale_mode):
    """Slots no token may attend (past each request's end, spare pages) hold NaN."""
    problem = _problem(rng, cache, scale_mode=scale_mode, scatter=True, future_fraction=0.5)
    ref = _reference(problem)
    poison_unused_slots(problem)
    _check(_run(problem, impl), ref, f"{impl} {cache} NaN-poisoned unused slots")


# The xla and the token paths with the specs of JAX_ROWS 0 and 1; union and k2q likewise (as in
# tests/test_jax_union.py, so the compiled functions are shared).
@pytest.mark.parametrize("impl, algorithm, layout, heads", [
    ("xla", "auto", "NHD", (8, 2)), ("pallas", "token", "HND", (16, 1)),
    ("pallas", "union", "NHD", (8, 2)), ("pallas", "k2q", "HND", (16, 1))],
    ids=["xla", "token-HND", "union-NHD", "k2q-HND"])
def test_garbage_topk_and_block_table(rng, impl, algorithm, layout, heads):
    problem = _problem(rng, layout=layout, heads=heads, scatter=True)
    problem.topk_indices = _garbage_topk(problem, rng)
    # Pages outside the cache in a block the token may see: masked, never followed.
    problem.metadata = garbage_block_table(problem)
    _check(_run(problem, impl, prefill_algorithm=algorithm), _reference(problem),
           f"{impl} {algorithm} {layout} garbage top-k")


# --- the seed's calls --------------------------------------------------------------------------

@pytest.mark.parametrize("impl, layout, decode_query_len", [
    ("pallas", "NHD", 1), ("pallas", "HND", 2), ("xla", "HND", 1)])
def test_seed_calls_match_reference(rng, impl, layout, decode_query_len):
    problem = _problem(rng, "fp8_e4m3", layout, (16, 4), decode_query_len=decode_query_len,
                       query_lens=[decode_query_len] * 2 + [20, 7], seq_lens=[400, 131, 300, 7],
                       scale_mode="per_slot", scatter=True, future_fraction=0.3)
    ref = _reference(problem)
    md, spec = problem.metadata, problem.spec
    nd, ndt = md.num_decodes, md.num_decode_tokens
    q, topk = jnp.asarray(problem.query), jnp.asarray(problem.topk_indices)
    cache = jnp.asarray(problem.kv_cache)
    k_scale, v_scale = _scales(problem)
    common = dict(kv_cache_layout=layout, implementation=impl)
    dec = md.decode
    out = jax_sparse.minimax_m3_sparse_attn_decode(
        q[:ndt], cache, topk[:, :ndt], jnp.asarray(dec.block_table), jnp.asarray(dec.seq_lens),
        spec.num_kv_heads, spec.scale, decode_query_len, k_scale, v_scale, **common)
    _check(out, ref[:ndt], f"{impl} {layout} seed decode L={decode_query_len}")
    pre = md.prefill
    out = jax_sparse.minimax_m3_sparse_attn(
        q[ndt:], cache, topk[:, ndt:], jnp.asarray(pre.block_table),
        jnp.asarray(pre.cu_seqlens_q), jnp.asarray(pre.seq_lens), jnp.asarray(pre.context_lens),
        pre.max_query_len, spec.num_kv_heads, spec.scale, k_scale, v_scale, **common)
    _check(out, ref[ndt:], f"{impl} {layout} seed prefill ({nd} decodes before)")


# --- jit: no recompilation across batches of the same padded sizes ----------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_no_recompile_across_batches(rng, impl):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4)
    traces = []

    @jax.jit
    def step(query, kv_cache, topk, metadata):
        traces.append(1)  # runs once per trace, not per call
        return jax_sparse.sparse_attention(spec, query, kv_cache, topk, metadata,
                                           implementation=impl)

    for i, (query, cache, topk, md) in enumerate(_same_shape_batches(rng, spec, MIXED_BATCHES)):
        out = step(jnp.asarray(query), jnp.asarray(cache), jnp.asarray(topk), interop.to_jax(md))
        ref = interop.reference_attention(spec, query, cache, topk, md)
        _check(out, ref, f"{impl} batch {i}")
    assert len(traces) == 1, f"{impl}: traced {len(traces)} times for 4 same-shape batches"
    assert step._cache_size() == 1, f"{impl}: {step._cache_size()} compilations"


def test_no_recompile_seed_decode(rng):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4)
    fn = jax_sparse.minimax_m3_sparse_attn_decode
    before = fn._cache_size()
    for query, cache, topk, md in _same_shape_batches(rng, spec, DECODE_BATCHES):
        out = fn(jnp.asarray(query), jnp.asarray(cache), jnp.asarray(topk),
                 jnp.asarray(md.block_table), jnp.asarray(md.seq_lens), spec.num_kv_heads,
                 spec.scale, 1)
        _check(out, interop.reference_attention(spec, query, cache, topk, md),
               f"seed decode {md.seq_lens}")
    assert fn._cache_size() - before == 1, f"{fn._cache_size() - before} compilations"


# --- bad input: ValueError at trace time naming field, value and expectation ------------------

def _bad_call(problem, **changes):
    """Trace sparse_attention without compiling or running it (jax.eval_shape)."""
    args = dict(query=jnp.asarray(problem.query), kv_cache=jnp.asarray(problem.kv_cache),
                topk_indices=jnp.asarray(problem.topk_indices),
                metadata=interop.to_jax(problem.metadata))
    kwargs = {k: changes.pop(k) for k in ("k_scale", "v_scale", "implementation", "num_splits")
              if k in changes}
    args.update(changes)
    jax.eval_shape(lambda *a: jax_sparse.sparse_attention(problem.spec, *a, **kwargs),
                   *args.values())


@pytest.mark.parametrize("change, match", [
    (lambda p: dict(query=jnp.asarray(p.query, jnp.float32)),
     r"query dtype float32 is not supported; expected one of bfloat16, float16"),
    (lambda p: dict(query=jnp.asarray(p.query)[:, :4]),
     r"query shape \(\d+, 4, 128\) does not match the spec: expected \[num_tokens, 8, 128\]"),
    (lambda p: dict(kv_cache=jnp.swapaxes(jnp.asarray(p.kv_cache), 2, 3)),
     r"kv_cache shape \(\d+, 2, 2, 128, 128\) does not match the spec: expected the NHD"),
    (lambda p: dict(kv_cache=jnp.asarray(p.kv_cache, jnp.float16)),
     r"kv_cache dtype float16 does not match the spec: expected float8_e4m3fn"),
    (lambda p: dict(topk_indices=jnp.asarray(p.topk_indices)[..., :3]),
     r"topk_indices shape \(2, \d+, 3\) does not match the spec: expected \[2, >= \d+, 8\]"),
    (lambda p: dict(topk_indices=jnp.asarray(p.topk_indices, jnp.float32)),
     r"topk_indices must hold integers, got dtype float32"),
    (lambda p: dict(k_scale=jnp.ones((2, 7))),
     r"k_scale shape \(2, 7\) does not match: expected a scalar or \[2, \d+\]"),
    (lambda p: dict(implementation="cuda"), r"implementation 'cuda' is unknown"),
    (lambda p: dict(num_splits=3), r"num_splits 3 must be a positive divisor of topk_blocks"),
    (lambda p: dict(metadata=interop.to_jax(p.metadata.replace(
        token_positions=p.metadata.token_positions[:5]))),
     r"metadata.token_positions has 5 entries but query has \d+ tokens"),
], ids=["query-dtype", "query-heads", "cache-layout", "cache-dtype", "topk-shape",
        "topk-dtype", "k-scale", "implementation", "num-splits", "metadata"])
def test_bad_input_raises_at_trace_time(rng, change, match):
    problem = _problem(rng, "fp8_e4m3")
    with pytest.raises(TypeError if "dtype" in match else ValueError, match=match):
        _bad_call(problem, **change(problem))


def test_bad_seed_call_raises(rng):
    problem = _problem(rng)
    q, cache = jnp.asarray(problem.query), jnp.asarray(problem.kv_cache)
    with pytest.raises(ValueError, match=r"kv_cache_layout 'NDH' is unknown"):
        jax_sparse.minimax_m3_sparse_attn_decode(
            q, cache, jnp.asarray(problem.topk_indices), jnp.zeros((3, 6), jnp.int32),
            jnp.ones(3, jnp.int32), 2, None, 1, kv_cache_layout="NDH")
    with pytest.raises(TypeError, match=r"kv_cache dtype float32 is not a cache dtype"):
        jax_sparse.minimax_m3_sparse_attn_decode(
            q, cache.astype(jnp.float32), jnp.asarray(problem.topk_indices),
            jnp.zeros((3, 6), jnp.int32), jnp.ones(3, jnp.int32), 2, None, 1)


# --- write_kv --------------------------------------------------------------------------------

def _read_slots(cache, spec, slots):
    """[T, 2, num_kv_heads, D] float32 at the slots, from the physical cache."""
    cache = np.asarray(jnp.asarray(cache, jnp.float32))
    pages, offsets = slots // spec.block_size, slots % spec.block_size
    if spec.kv_cache_layout == "NHD":
        return cache[pages, :, offsets]
    return cache[pages, :, :, offsets]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache, scale_mode", [
    ("auto", "none"), ("float16", "none"),
    *[(c, m) for c in ("fp8_e4m3", "fp8_e5m2") for m in ("none", "scalar", "per_slot")]])
def test_write_kv_round_trip(rng, layout, cache, scale_mode):
    problem = _problem(rng, cache, layout, scale_mode=scale_mode)
    spec, md = problem.spec, problem.metadata
    before = np.asarray(problem.kv_cache, np.float32)
    k_scale, v_scale = _scales(problem)
    out = jax_sparse.write_kv(jnp.asarray(problem.kv_cache), jnp.asarray(problem.key),
                              jnp.asarray(problem.value), jnp.asarray(md.slot_mapping), spec,
                              k_scale, v_scale)
    assert out.dtype == problem.kv_cache.dtype and out.shape == problem.kv_cache.shape
    slots = md.slot_mapping[md.slot_mapping >= 0]
    written = _read_slots(out, spec, slots)
    new = np.stack([problem.key, problem.value], 1).astype(np.float32)[:slots.size]
    if scale_mode != "none":  # dequantize: stored value times the slot's scale
        num_slots = problem.kv_cache.shape[0] * spec.block_size
        for i, scale in enumerate((problem.k_scale, problem.v_scale)):
            per_slot = np.broadcast_to(np.asarray(scale, np.float32),
                                       (spec.num_kv_heads, num_slots))
            written[:, i] *= per_slot[:, slots].T[..., None]
    tol = {"fp8_e4m3": 2**-3, "fp8_e5m2": 2**-2}.get(cache, 2**-7)
    err = np.abs(written - new).max() / np.abs(new).max()
    assert err < tol, f"{cache} {layout} {scale_mode}: round trip error {err:.3g}"
    # Every other slot, padding tokens' included (slot -1), is unchanged.
    after = np.asarray(jnp.asarray(out, jnp.float32))
    touched = np.zeros(after.shape, bool)
    if layout == "NHD":
        touched[slots // 128, :, slots % 128] = True
    else:
        touched[slots // 128, :, :, slots % 128] = True
    assert np.array_equal(after[~touched], before[~touched]), f"{cache} {layout}: stray writes"


@pytest.mark.parametrize("cache", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("scale_mode", ["none", "scalar", "per_slot"])
def test_write_kv_fp8_saturates(rng, cache, scale_mode):
    problem = _problem(rng, cache, "HND", scale_mode=scale_mode)
    spec, md = problem.spec, problem.metadata
    fp8_max = interop.FP8_MAX[spec.cache_storage_dtype("bfloat16")]
    huge = np.full(problem.key.shape, 1e38, np.float32)
    huge[::2] *= -1
    k_scale, v_scale = _scales(problem)
    out = jax_sparse.write_kv(jnp.asarray(problem.kv_cache), jnp.asarray(huge, jnp.bfloat16),
                              jnp.asarray(huge, jnp.bfloat16), jnp.asarray(md.slot_mapping),
                              spec, k_scale, v_scale)
    written = _read_slots(out, spec, md.slot_mapping[md.slot_mapping >= 0])
    expected = np.sign(huge[:written.shape[0], None]) * fp8_max
    assert np.array_equal(written, np.broadcast_to(expected, written.shape)), \
        f"{cache} {scale_mode}: not saturated to +-{fp8_max}"


def test_write_kv_then_attention(rng):
    """The kernels read what write_kv wrote (new tokens' K/V, FP8 with per-slot scales)."""
    problem = _problem(rng, "fp8_e4m3", "NHD", (8, 2), scale_mode="per_slot", scatter=True)
    k_scale, v_scale = _scales(problem)
    cache = jax_sparse.write_kv(jnp.asarray(problem.kv_cache), jnp.asarray(problem.key),
                                jnp.asarray(problem.value),
                                jnp.asarray(problem.metadata.slot_mapping), problem.spec,
                                k_scale, v_scale)
    problem.kv_cache = np.asarray(cache)
    _check(_run(problem, "pallas"), _reference(problem), "after write_kv")


def test_write_kv_bad_input(rng):
    problem = _problem(rng)
    cache, key = jnp.asarray(problem.kv_cache), jnp.asarray(problem.key)
    slots = jnp.asarray(problem.metadata.slot_mapping)
    with pytest.raises(ValueError, match=r"key shape \(\d+, 2, 64\) does not match the spec"):
        jax_sparse.write_kv(cache, key[..., :64], key[..., :64], slots, problem.spec)
    with pytest.raises(ValueError, match=r"slot_mapping has 3 entries: expected \d+"):
        jax_sparse.write_kv(cache, key, key, slots[:3], problem.spec)


def test_write_kv_donates_the_cache(rng):
    """The returned cache is the donated input buffer (XLA wrote in place)."""
    problem = _problem(rng, "fp8_e4m3", scale_mode="per_slot")
    cache = jnp.asarray(problem.kv_cache)
    pointer = cache.unsafe_buffer_pointer()
    k_scale, v_scale = _scales(problem)
    out = jax_sparse.write_kv(cache, jnp.asarray(problem.key), jnp.asarray(problem.value),
                              jnp.asarray(problem.metadata.slot_mapping), problem.spec,
                              k_scale, v_scale)
    assert cache.is_deleted(), "the cache was not donated"
    assert out.unsafe_buffer_pointer() == pointer, "write_kv copied the cache"


# --- GPU: compiled Pallas (Triton) at MiniMax-M3 shapes ----------------------------------------

M3_HEADS = [(64, 4), (16, 1)]


@pytest.mark.gpu
@jax_on_gpu
@pytest.mark.parametrize("heads, layout, cache, impl", [
    *[(h, layout, cache, "pallas") for h in M3_HEADS for layout in ("NHD", "HND")
      for cache in ("auto", "fp8_e4m3")],
    ((64, 4), "HND", "fp8_e4m3", "xla")], ids=lambda v: "-".join(map(str, v)) if
    isinstance(v, tuple) else None)
def test_gpu_m3_shapes(rng, impl, layout, cache, heads):
    problem = _problem(rng, cache, layout, heads, topk=16,
                       query_lens=[1] * 6 + [200, 100],
                       seq_lens=[32768, 9000, 129, 2000, 20000, 5, 200, 4400],
                       scale_mode="per_slot" if cache != "auto" else "none", scatter=True,
                       future_fraction=0.2, empty_fraction=0.01)
    _check(_run(problem, impl), _device_reference(problem),
           f"gpu {impl} {cache} {layout} {heads}")


@pytest.mark.gpu
@jax_on_gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("cache", ["fp8_e4m3", "fp8_e5m2"])
def test_gpu_packed_fp8_cache(rng, layout, cache):
    """The compiled uint16-pair path (caches past 2^31 elements) on a small cache."""
    problem = _problem(rng, cache, layout, (64, 4), topk=16, query_lens=[1] * 4 + [150],
                       seq_lens=[9000, 129, 2000, 300, 4400], scale_mode="per_slot",
                       scatter=True, future_fraction=0.2)
    _check(_run_packed(problem), _device_reference(problem), f"gpu packed {cache} {layout}")


@pytest.mark.gpu
@jax_on_gpu
def test_gpu_speculative_decode_16_1(rng):
    problem = _problem(rng, "fp8_e4m3", "NHD", (16, 1), topk=16, decode_query_len=2,
                       query_lens=[2] * 8 + [200], seq_lens=[32768] * 4 + [3000] * 4 + [5000],
                       scale_mode="per_slot")
    _check(_run(problem, "pallas"), _device_reference(problem), "gpu 16/1 speculative decode")
