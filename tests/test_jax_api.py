"""jax_sparse's public surface (issue 20): allocating a cache, the implementations' knobs,
and `sparse_attention` under an outer `jax.jit`."""
import numpy as np
import pytest

import interop
from interop.testing import random_problem, relative_error

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jax_sparse  # noqa: E402

TOL = 1e-2
QUERY_LENS, SEQ_LENS = [1, 1, 12], [300, 129, 140]


def _problem(rng, cache="auto", layout="NHD", scale_mode="none"):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=8, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    return random_problem(spec, QUERY_LENS, SEQ_LENS, rng, scale_mode=scale_mode,
                          num_tokens=16, scatter=True)


# --- allocate_kv_cache -------------------------------------------------------------------------

@pytest.mark.parametrize("cache, dtype, storage", [
    ("auto", None, "bfloat16"), ("auto", "float16", "float16"), ("auto", jnp.float16, "float16"),
    ("float16", "bfloat16", "float16"), ("fp8_e4m3", None, "float8_e4m3fn"),
    ("fp8_e5m2", "float16", "float8_e5m2")])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_allocate_kv_cache_layout_dtype_and_zeros(cache, dtype, storage, layout):
    spec = interop.SparseAttentionSpec(8, 2, kv_cache_dtype=cache, kv_cache_layout=layout)
    out = jax_sparse.allocate_kv_cache(spec, 5, dtype=dtype)
    assert out.shape == spec.physical_kv_cache_shape(5), out.shape
    assert jnp.dtype(out.dtype).name == storage, out.dtype
    assert not np.asarray(out.astype(jnp.float32)).any(), "not zero-filled"


def test_allocate_kv_cache_fill_device_and_errors():
    spec = interop.SparseAttentionSpec(8, 2, kv_cache_dtype="fp8_e4m3")
    full = np.asarray(jax_sparse.allocate_kv_cache(spec, 2, fill=1e9).astype(jnp.float32))
    assert (full == interop.FP8_MAX["float8_e4m3fn"]).all(), "FP8 fill not saturated"
    nan = np.asarray(jax_sparse.allocate_kv_cache(spec, 2, fill=np.nan).astype(jnp.float32))
    assert np.isnan(nan).all(), "NaN fill lost"
    device = jax.devices("cpu")[1]
    assert jax_sparse.allocate_kv_cache(spec, 2, device=device).devices() == {device}
    mesh = Mesh(np.array(jax.devices("cpu")[:2]).reshape(2, 1), ("dp", "tp"))
    sharding = jax_sparse.kv_cache_sharding(mesh, spec)
    assert jax_sparse.allocate_kv_cache(spec, 4, device=sharding).sharding == sharding
    with pytest.raises(TypeError, match=r"dtype float32 is not a query dtype"):
        jax_sparse.allocate_kv_cache(spec, 2, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"num_blocks must be an int >= 1, got 0"):
        jax_sparse.allocate_kv_cache(spec, 0)


def test_allocated_cache_written_then_read(rng):
    """write_kv into a fresh cache, then attention over what it wrote (the unwritten slots
    are zeros, never read)."""
    problem = _problem(rng, "fp8_e4m3", "HND", "per_slot")
    spec, md = problem.spec, problem.metadata
    cache = jax_sparse.allocate_kv_cache(spec, problem.kv_cache.shape[0])
    # Fill every slot the batch may attend: the context through its own slots, then the batch.
    num_slots = problem.kv_cache.shape[0] * spec.block_size
    context = np.asarray(problem.kv_cache)
    slots = np.arange(num_slots)
    if spec.kv_cache_layout == "HND":
        kv = np.swapaxes(context, 2, 3)
    else:
        kv = context
    k_ctx = kv[:, 0].reshape(num_slots, spec.num_kv_heads, spec.head_size).astype(np.float32)
    v_ctx = kv[:, 1].reshape(num_slots, spec.num_kv_heads, spec.head_size).astype(np.float32)
    ones = jnp.ones((spec.num_kv_heads, num_slots), jnp.float32)
    cache = jax_sparse.write_kv(cache, jnp.asarray(k_ctx, jnp.bfloat16),
                                jnp.asarray(v_ctx, jnp.bfloat16), slots, spec, ones, ones)
    assert np.array_equal(np.asarray(cache.astype(jnp.float32)),
                          np.asarray(problem.kv_cache).astype(np.float32)), "cache differs"
    k_scale, v_scale = (jnp.asarray(s) for s in (problem.k_scale, problem.v_scale))
    out = jax_sparse.sparse_attention(spec, jnp.asarray(problem.query), cache,
                                      jnp.asarray(problem.topk_indices), interop.to_jax(md),
                                      k_scale=k_scale, v_scale=v_scale, implementation="xla")
    ref = interop.reference_attention(spec, problem.query, problem.kv_cache,
                                      problem.topk_indices, md, problem.k_scale,
                                      problem.v_scale)
    assert relative_error(out, ref) < TOL


# --- the implementations' knobs ----------------------------------------------------------------

def _args(problem):
    return (problem.spec, jnp.asarray(problem.query), jnp.asarray(problem.kv_cache),
            jnp.asarray(problem.topk_indices), interop.to_jax(problem.metadata))


def _reference(problem):
    return interop.reference_attention(problem.spec, problem.query, problem.kv_cache,
                                       problem.topk_indices, problem.metadata,
                                       problem.k_scale, problem.v_scale)


@pytest.mark.parametrize("implementation, knob, takes", [
    ("xla", "num_splits", "token_chunk"), ("xla", "num_warps", "token_chunk"),
    ("xla", "num_stages", "token_chunk"), ("tpu", "num_splits", "tile_tokens, pipeline_depth"),
    ("tpu", "num_warps", "tile_tokens"), ("tpu", "num_stages", "tile_tokens"),
    ("mosaic", "num_warps", "num_splits, pages_in_flight"),
    ("mosaic", "num_stages", "num_splits, pages_in_flight")])
def test_a_knob_the_implementation_ignores_is_an_error(rng, implementation, knob, takes):
    problem = _problem(rng)
    with pytest.raises(ValueError, match=rf"{knob}=2 is not a knob of implementation="
                                         rf"'{implementation}': it takes {takes}"):
        jax.eval_shape(lambda *a: jax_sparse.sparse_attention(
            problem.spec, *a, implementation=implementation, **{knob: 2}), *_args(problem)[1:])


def test_configs(rng):
    problem = _problem(rng)
    for family in jax_sparse.CONFIGS.values():
        assert family.get_default() == family(), family
        hash(family.get_default())  # a jit static
    with pytest.raises(ValueError, match=r"config XlaConfig\(token_chunk=8\) is not for "
                                         r"implementation='pallas': expected a "
                                         r"jax_sparse.PallasConfig"):
        jax_sparse.sparse_attention(*_args(problem), implementation="pallas",
                                    config=jax_sparse.XlaConfig())
    for make, match in [(lambda: jax_sparse.PallasConfig(num_splits=0), r"num_splits \(0\) must "
                         r"be >= 1, an int \(PallasConfig\)"),
                        (lambda: jax_sparse.PallasConfig(num_warps=2.5), r"num_warps \(2.5\)"),
                        (lambda: jax_sparse.MosaicConfig(pages_in_flight=0), r"pages_in_flight"),
                        (lambda: jax_sparse.TpuConfig(pipeline_depth=1), r"pipeline_depth \(1\) "
                         r"must be >= 2"),
                        (lambda: jax_sparse.XlaConfig(token_chunk=0), r"token_chunk \(0\)")]:
        with pytest.raises(ValueError, match=match):
            make()
    # Loose knobs go onto the given config.
    config = jax_sparse.implementation_config("pallas", jax_sparse.PallasConfig(num_warps=4),
                                              num_splits=2, num_stages=None)
    assert config == jax_sparse.PallasConfig(num_splits=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("implementation, config", [
    ("pallas", jax_sparse.PallasConfig(num_splits=2, num_warps=4, num_stages=1)),
    ("tpu", jax_sparse.TpuConfig(tile_tokens=3, pipeline_depth=2)),
    ("xla", jax_sparse.XlaConfig(token_chunk=3))], ids=lambda v: str(v)[:12])
def test_configs_reach_the_kernels(rng, implementation, config):
    problem = _problem(rng, "fp8_e4m3", "HND", "per_slot")
    k_scale, v_scale = (jnp.asarray(s) for s in (problem.k_scale, problem.v_scale))
    out = jax_sparse.sparse_attention(*_args(problem), k_scale=k_scale, v_scale=v_scale,
                                      implementation=implementation, config=config)
    assert relative_error(out, _reference(problem)) < TOL


# --- sparse_attention under an outer jax.jit ---------------------------------------------------

@pytest.mark.parametrize("implementation, algorithm, knobs", [
    ("pallas", "union", dict(num_splits=2, num_warps=4, num_stages=1)),
    ("pallas", "token", dict(config=jax_sparse.PallasConfig(num_splits=4))),
    ("tpu", "k2q", dict(config=jax_sparse.TpuConfig(tile_tokens=5))),
    ("xla", "auto", dict(config=jax_sparse.XlaConfig(token_chunk=4)))], ids=str)
def test_outer_jit_with_every_keyword(rng, implementation, algorithm, knobs):
    """jax.jit(sparse_attention, static_argnames=STATIC_ARGNAMES) with every keyword, and
    sparse_attention inside a jitted step: both match the reference."""
    problem = _problem(rng, "fp8_e4m3", "NHD", "per_slot")
    spec, q, cache, topk, md = _args(problem)
    kw = dict(k_scale=jnp.asarray(problem.k_scale), v_scale=jnp.asarray(problem.v_scale),
              implementation=implementation, prefill_algorithm=algorithm, fp8_dot=False,
              **knobs)
    ref = _reference(problem)
    attend = jax.jit(jax_sparse.sparse_attention, static_argnames=jax_sparse.STATIC_ARGNAMES)
    assert relative_error(attend(spec, q, cache, topk, md, **kw), ref) < TOL

    @jax.jit
    def step(q, cache, topk, md, k_scale, v_scale):
        return jax_sparse.sparse_attention(spec, q, cache, topk, md, **dict(
            kw, k_scale=k_scale, v_scale=v_scale))

    assert relative_error(step(q, cache, topk, md, kw["k_scale"], kw["v_scale"]), ref) < TOL


def test_fp8_dot_is_a_value_error(rng):
    """jax_sparse has no FP8 tensor-core path: fp8_dot=True says so before any launch."""
    problem = _problem(rng, "fp8_e4m3", "NHD", "none")
    with pytest.raises(ValueError, match="fp8_dot=True: jax_sparse has no FP8 tensor-core"):
        jax_sparse.sparse_attention(*_args(problem), fp8_dot=True)


def test_outer_jit_without_static_knobs_says_how(rng):
    """jax.jit(sparse_attention, static_argnums=0) (the spec alone static): array keywords
    work; a knob it traced is a TypeError naming STATIC_ARGNAMES."""
    problem = _problem(rng)
    attend = jax.jit(jax_sparse.sparse_attention, static_argnums=0)
    out = attend(*_args(problem), k_scale=None, v_scale=None)
    assert relative_error(out, _reference(problem)) < TOL
    with pytest.raises(TypeError, match=r"num_splits is traced: .*static_argnames="
                                        r"jax_sparse.STATIC_ARGNAMES"):
        attend(*_args(problem), num_splits=2)
