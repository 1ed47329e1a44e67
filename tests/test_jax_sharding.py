"""jax_sparse on a device mesh: sharded_sparse_attention and sharded_write_kv on 4 host CPU
devices (tests/conftest.py sets --xla_force_host_platform_device_count=4), against the unsharded
call of the same implementation on each data-parallel rank's batch and the float64 reference."""
import importlib.util

import numpy as np
import pytest

import interop
from interop.metadata import COUNT_FIELDS
from interop.testing import poison_unused_slots, random_problem, relative_error

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_sparse  # noqa: E402

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 4, reason="needs 4 devices (on CPU: XLA_FLAGS="
    "--xla_force_host_platform_device_count=4, which tests/conftest.py sets)")

TOL = 1e-2        # against the float64 reference (as tests/test_jax_token.py)
SAME_TOL = 1e-4   # against the same implementation unsharded, with the same knobs
HAS_TPU_MODULE = importlib.util.find_spec("jax_sparse.tpu") is not None
IMPLS = [
    "xla", "pallas",
    pytest.param("tpu", marks=pytest.mark.skipif(
        not HAS_TPU_MODULE, reason="jax_sparse/tpu.py (the Pallas TPU kernels) does not exist "
        "yet")),
    pytest.param("mosaic", marks=pytest.mark.skipif(
        jax.default_backend() != "gpu", reason="Pallas Mosaic GPU runs on a GPU only (no CPU "
        "interpreter)")),
]
# One batch per data-parallel rank, padded to TOKENS rows: different request counts, decode
# and prefill mixes (rank 2 decodes only, rank 3 prefills only).
RANK_BATCHES = [([1, 1, 1, 13], [300, 129, 600, 540]),
                ([1, 9], [260, 9]),
                ([1, 1, 1], [5, 131, 700]),
                ([20], [400])]
TOKENS = 24


def _knobs(impl):
    """The Pallas token kernel's splits pinned: by default they follow each device's grid
    (fewer KV heads per device, more splits), which changes the rounding, not the result."""
    return dict(num_splits=2) if impl == "pallas" else {}


def _mesh(dp, tp, axis_type=AxisType.Auto):
    """A ("dp", "tp") mesh; Auto axes (Mesh's default) or Explicit ones (jax.make_mesh's)."""
    return Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("dp", "tp"),
                axis_types=(axis_type, axis_type))


def _rank_problems(rng, dp, heads, cache="auto", layout="NHD", scale_mode="none",
                   batches=RANK_BATCHES, max_blocks=None):
    """One random batch per rank (its own pages, rank-local indices, no padding rows: the
    packing pads them); one scalar scale shared by the ranks (a layer's)."""
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=8, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    problems = [random_problem(spec, q, s, rng, scale_mode=scale_mode, max_blocks=max_blocks,
                               scatter=True, future_fraction=0.3, empty_fraction=0.1)
                for q, s in batches[:dp]]
    if scale_mode == "scalar":
        for p in problems[1:]:
            p.k_scale, p.v_scale = problems[0].k_scale, problems[0].v_scale
    return problems


def _pad_pages(x, axis, size, fill):
    """x padded with `fill` to `size` along `axis`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x.astype(np.float32), pad, constant_values=fill).astype(x.dtype)


def _token_rows(problems, name, axis=0, fill=1.0):
    """The ranks' token arrays, each padded to TOKENS rows, concatenated. Padding rows must
    stay inert whatever they hold: queries and K/V of ones, top-k rows of block 0 (a block any
    real token may see)."""
    return np.concatenate([_pad_pages(getattr(p, name), axis, TOKENS, fill) for p in problems],
                          axis=axis)


def _global_inputs(problems, pages=None, num_reqs=None):
    """The ranks' arrays concatenated: tokens, pages (padded with NaN pages no rank may read)
    and per-slot scales; the metadata packed."""
    spec = problems[0].spec
    pages = pages or max(p.kv_cache.shape[0] for p in problems)
    cache = np.concatenate([_pad_pages(p.kv_cache, 0, pages, np.nan) for p in problems])
    scales = [getattr(problems[0], name) for name in ("k_scale", "v_scale")]
    if np.ndim(scales[0]) == 2:  # per slot: the ranks' slots in turn
        scales = [np.concatenate([_pad_pages(getattr(p, name), 1, pages * spec.block_size, 1.0)
                                  for p in problems], axis=1) for name in ("k_scale", "v_scale")]
    return dict(query=_token_rows(problems, "query"), kv_cache=cache,
                topk_indices=_token_rows(problems, "topk_indices", axis=1, fill=0),
                metadata=jax_sparse.pack_dp_metadata([p.metadata for p in problems],
                                                     num_tokens=TOKENS, num_reqs=num_reqs),
                k_scale=scales[0], v_scale=scales[1])


def _unsharded(problem, inputs, d, impl, **kw):
    """Rank d's batch through the unsharded call: its slices of the global arrays (the same
    padded sizes for every rank, so one compilation serves them all)."""
    packed, dp = inputs["metadata"], inputs["metadata"].num_decode_tokens.shape[0]
    tokens = slice(d * TOKENS, (d + 1) * TOKENS)
    pages = inputs["kv_cache"].shape[0] // dp
    slots = slice(d * pages * problem.spec.block_size, (d + 1) * pages * problem.spec.block_size)
    metadata = jax_sparse.pack_dp_metadata(
        [problem.metadata], num_tokens=TOKENS, num_reqs=packed.block_table.shape[0] // dp,
        max_blocks=packed.block_table.shape[1])
    metadata = metadata.replace(**{f: int(getattr(metadata, f)[0]) for f in COUNT_FIELDS})
    k_scale, v_scale = (s if np.ndim(s) < 2 else s[:, slots]
                        for s in (inputs["k_scale"], inputs["v_scale"]))
    return jax_sparse.sparse_attention(
        problem.spec, jnp.asarray(inputs["query"][tokens]),
        jnp.asarray(inputs["kv_cache"][d * pages:(d + 1) * pages]),
        jnp.asarray(inputs["topk_indices"][:, tokens]), interop.to_jax(metadata),
        k_scale=k_scale, v_scale=v_scale, implementation=impl, **kw)


def _check_ranks(out, problems, references, inputs, mesh, impl, label, **kw):
    """Each rank's rows against the reference and the same implementation unsharded; the
    output's sharding."""
    expected = NamedSharding(mesh, P("dp", "tp"))
    assert out.sharding.is_equivalent_to(expected, out.ndim), \
        f"{label}: output sharding {out.sharding}, expected {expected}"
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert out.shape == (len(problems) * TOKENS, *problems[0].query.shape[1:]), \
        f"{label}: output shape {out.shape}"
    for d, (problem, ref) in enumerate(zip(problems, references)):
        rows = out[d * TOKENS:(d + 1) * TOKENS]
        err = relative_error(rows[:ref.shape[0]], ref)
        assert err < TOL, f"{label} rank {d}: relative error {err:.3g} >= {TOL} (reference)"
        zero = ~ref.any(axis=(1, 2))  # rows with no valid entry
        assert not rows[:ref.shape[0]][zero].any(), \
            f"{label} rank {d}: rows with no valid entry are not all zeros"
        assert not rows[ref.shape[0]:].any(), f"{label} rank {d}: padding rows are not zeros"
        same = np.asarray(_unsharded(problem, inputs, d, impl, **kw).astype(jnp.float32),
                          np.float64)
        err = relative_error(rows, same)
        assert err < SAME_TOL, (f"{label} rank {d}: relative error {err:.3g} >= {SAME_TOL} "
                                f"against the unsharded {impl} call")


def _references(problems):
    """float64 references, then every slot no token may attend poisoned with NaN."""
    refs = [interop.reference_attention(p.spec, p.query, p.kv_cache, p.topk_indices, p.metadata,
                                        p.k_scale, p.v_scale) for p in problems]
    for p in problems:
        poison_unused_slots(p)
    return refs


def _sharded_case(rng, impl, mesh, heads, cache="auto", layout="NHD", scale_mode="none", **kw):
    """Random ranks' batches through sharded_sparse_attention, checked rank by rank."""
    problems = _rank_problems(rng, mesh.shape["dp"], heads, cache, layout, scale_mode)
    references = _references(problems)
    inputs = _global_inputs(problems)
    kw = {**_knobs(impl), **kw}
    out = jax_sparse.sharded_sparse_attention(mesh, problems[0].spec, **inputs,
                                              implementation=impl, **kw)
    _check_ranks(out, problems, references, inputs, mesh, impl,
                 f"{impl} {dict(mesh.shape)} {heads} {cache} {layout} {scale_mode} {kw}", **kw)


@pytest.mark.parametrize("mesh_shape, axis_type, layout", [
    ((4, 1), AxisType.Auto, "NHD"), ((1, 4), AxisType.Auto, "HND"),
    ((2, 2), AxisType.Explicit, "HND")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1])
def test_sharded_matches_each_rank(rng, mesh_shape, axis_type, layout):
    """Every mesh with the default implementation; the others run on a mesh below (the
    sharding wraps whichever implementation runs on each device)."""
    _sharded_case(rng, "pallas", _mesh(*mesh_shape, axis_type), (8, 4), layout=layout)


@pytest.mark.parametrize("impl", IMPLS)
def test_sharded_fp8_per_slot_scales(rng, impl):
    """Data and tensor parallel at once (2 x 2), per-slot scales sharded with the cache."""
    _sharded_case(rng, impl, _mesh(2, 2), (16, 2), "fp8_e4m3", "NHD", "per_slot")


@pytest.mark.parametrize("algorithm", ["union", "k2q"])
def test_sharded_pallas_prefill_algorithms(rng, algorithm):
    _sharded_case(rng, "pallas", _mesh(2, 2), (8, 2), "fp8_e4m3", "HND", "scalar",
                  prefill_algorithm=algorithm)


# --- write_kv on the mesh ----------------------------------------------------------------------

def _written_cache(problem):
    """The rank's cache after the unsharded write_kv of its new K/V, as NumPy."""
    return np.asarray(jax_sparse.write_kv(
        jnp.asarray(problem.kv_cache), jnp.asarray(problem.key), jnp.asarray(problem.value),
        jnp.asarray(problem.metadata.slot_mapping), problem.spec, problem.k_scale,
        problem.v_scale))


@pytest.mark.parametrize("cache, scale_mode, layout, axis_type", [
    ("auto", "none", "NHD", AxisType.Auto), ("fp8_e4m3", "per_slot", "HND", AxisType.Explicit)],
    ids=["bf16-NHD-Auto", "fp8-per-slot-HND-Explicit"])
def test_sharded_write_kv(rng, cache, scale_mode, layout, axis_type):
    problems = _rank_problems(rng, 2, (8, 4), cache, layout, scale_mode)
    spec, mesh = problems[0].spec, _mesh(2, 2, axis_type)
    inputs = _global_inputs(problems)
    sharding = jax_sparse.kv_cache_sharding(mesh, spec)
    part = P("dp", None, None, "tp") if layout == "NHD" else P("dp", None, "tp")
    assert sharding.is_equivalent_to(NamedSharding(mesh, part), 5), f"{layout}: {sharding}"
    kv_cache = jax.device_put(inputs["kv_cache"], sharding)
    pointers = [s.data.unsafe_buffer_pointer() for s in kv_cache.addressable_shards]
    out = jax_sparse.sharded_write_kv(
        mesh, kv_cache, _token_rows(problems, "key"), _token_rows(problems, "value"),
        inputs["metadata"].slot_mapping, spec, inputs["k_scale"], inputs["v_scale"])
    assert kv_cache.is_deleted(), "the sharded cache was not donated"
    assert out.sharding.is_equivalent_to(kv_cache.sharding, out.ndim), \
        f"cache sharding {out.sharding}, expected {kv_cache.sharding}"
    assert sorted(s.data.unsafe_buffer_pointer() for s in out.addressable_shards) == \
        sorted(pointers), "sharded_write_kv copied the cache instead of writing in place"
    written = np.asarray(out.astype(jnp.float32))
    pages = written.shape[0] // 2
    for d, p in enumerate(problems):
        expected = _written_cache(p).astype(np.float32)
        own = written[d * pages:d * pages + expected.shape[0]]
        assert np.array_equal(own, expected, equal_nan=True), \
            f"{cache} {layout} rank {d}: cache differs from the unsharded write_kv"
        spare = written[d * pages + expected.shape[0]:(d + 1) * pages]
        assert np.isnan(spare).all(), f"rank {d}: a write landed on a padding page"


# Two steps' batches of the same padded sizes (pages, requests, block-table width, tokens).
STEP_BATCHES = [RANK_BATCHES[:2], [([1, 1, 12], [900, 40, 12]),
                                   ([1, 1, 1, 1], [128, 257, 3, 77])]]


def test_jitted_step_no_recompile(rng):
    """write_kv + attention in one outer jit with the cache donated; the second step's batch
    (other lengths, same padded sizes) reuses the compiled step."""
    mesh, traces = _mesh(2, 2), []

    def step(kv_cache, key, value, query, topk, metadata):
        traces.append(1)  # runs once per trace
        kv_cache = jax_sparse.sharded_write_kv(mesh, kv_cache, key, value,
                                               metadata.slot_mapping, spec)
        return kv_cache, jax_sparse.sharded_sparse_attention(
            mesh, spec, query, kv_cache, topk, metadata, implementation="xla")

    step = jax.jit(step, donate_argnums=0)
    for i, batches in enumerate(STEP_BATCHES):
        problems = _rank_problems(rng, 2, (8, 4), layout="HND", batches=batches, max_blocks=8)
        spec = problems[0].spec
        inputs = _global_inputs(problems, pages=24, num_reqs=4)
        metadata = jax.device_put(inputs["metadata"], NamedSharding(mesh, P("dp")))
        _, out = step(jax.device_put(inputs["kv_cache"], jax_sparse.kv_cache_sharding(mesh, spec)),
                      _token_rows(problems, "key"), _token_rows(problems, "value"),
                      inputs["query"], inputs["topk_indices"], metadata)
        references = []
        for p in problems:
            p.kv_cache = _written_cache(p)
            references.append(interop.reference_attention(
                spec, p.query, p.kv_cache, p.topk_indices, p.metadata))
        inputs = _global_inputs(problems, pages=24, num_reqs=4)  # the written caches
        _check_ranks(out, problems, references, inputs, mesh, "xla", f"jitted step {i}")
    assert len(traces) == 1, f"traced {len(traces)} times for 2 same-shape steps"
    assert step._cache_size() == 1, f"{step._cache_size()} compilations"


# --- bad input -------------------------------------------------------------------------------

def _bad_call(problems, mesh, **changes):
    inputs = _global_inputs(problems)
    kwargs = {k: changes.pop(k) for k in ("dp_axis", "tp_axis") if k in changes}
    inputs.update(changes)
    jax.eval_shape(lambda inputs: jax_sparse.sharded_sparse_attention(
        mesh, problems[0].spec, **inputs, **kwargs), inputs)


@pytest.mark.parametrize("heads, change, match", [
    ((8, 2), {}, r"the tensor-parallel axis has 4 devices, which must divide num_kv_heads "
                 r"\(2\)"),
    ((8, 4), dict(dp_axis="data"), r"dp_axis 'data' is not an axis of the mesh; its axes are "
                                   r"\('dp', 'tp'\)"),
    ((8, 4), dict(tp_axis="dp"), r"dp_axis and tp_axis are both 'dp'"),
    ((8, 4), "unpacked", r"metadata.num_decode_tokens has shape \(\): expected \(1,\)"),
], ids=["tp-divides-kv-heads", "unknown-axis", "same-axis", "unpacked-metadata"])
def test_bad_mesh_input_raises(rng, heads, change, match):
    problems = _rank_problems(rng, 1, heads)
    if change == "unpacked":  # one rank's count as a scalar, as build_metadata gives it
        packed = _global_inputs(problems)["metadata"]
        change = dict(metadata=packed.replace(num_decode_tokens=packed.num_decode_tokens[0]))
    with pytest.raises(ValueError, match=match):
        _bad_call(problems, _mesh(1, 4), **change)


def test_bad_dp_split_raises(rng):
    problems = _rank_problems(rng, 2, (8, 4))
    query = _global_inputs(problems)["query"][:-3]
    with pytest.raises(ValueError, match=r"query has 45 token rows, not a multiple of the 2 "
                                         r"data-parallel ranks"):
        _bad_call(problems, _mesh(2, 2), query=query)


def test_pack_dp_metadata(rng):
    problems = _rank_problems(rng, 3, (8, 4))
    shards = [p.metadata for p in problems]
    packed = jax_sparse.pack_dp_metadata(shards, num_tokens=30, max_blocks=9)
    for d, md in enumerate(shards):
        tokens, reqs = slice(d * 30, d * 30 + md.num_tokens), slice(d * 4, d * 4 + md.num_reqs)
        for name in ("token_to_req", "token_positions", "slot_mapping"):
            assert np.array_equal(getattr(packed, name)[tokens], getattr(md, name)), name
        pad = slice(d * 30 + md.num_tokens, (d + 1) * 30)
        assert (packed.token_positions[pad] == -1).all() and (packed.slot_mapping[pad] == -1).all()
        table = packed.block_table[d * 4:(d + 1) * 4]
        width = md.block_table.shape[1]
        assert np.array_equal(table[:md.num_reqs, :width], md.block_table)
        assert (table[:, width:] == -1).all() and (table[md.num_reqs:] == -1).all()
        assert np.array_equal(packed.seq_lens[reqs], md.seq_lens)
        assert not packed.seq_lens[d * 4 + md.num_reqs:(d + 1) * 4].any()
        starts = packed.query_start_loc[d * 5:(d + 1) * 5]
        assert np.array_equal(starts[:md.num_reqs + 1], md.query_start_loc)
        assert (starts[md.num_reqs:] == md.num_actual_tokens).all()
        for name in COUNT_FIELDS:
            assert getattr(packed, name)[d] == getattr(md, name), name
    with pytest.raises(ValueError, match=r"num_tokens \(12\) is smaller than rank 0's 16"):
        jax_sparse.pack_dp_metadata(shards, num_tokens=12)
    with pytest.raises(ValueError, match=r"non-empty sequence of SparseMetadata"):
        jax_sparse.pack_dp_metadata([])
