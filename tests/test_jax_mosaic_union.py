"""The Mosaic GPU union prefill kernel (`jax_sparse/mosaic_union.py`) and its dispatch.

CPU (no interpreter: Mosaic GPU's is private and does not take these kernels): the row table,
the per-entry key counts and the chunk plan against a NumPy derivation of the contract (every
(token, KV head, page, key) the kernel's masks let through is exactly what the contract
attends; V rows past the entry's key count are attended by no row), the dispatcher's choice of
kernels (`dispatch.HOPPER_AUTO`, also lowered for CUDA), the shared-memory budget, and the
real kernel lowered for CUDA (layouts, 16-bit and FP8 caches, GQA groups, pipeline depths,
with and without ping-pong, the persistent grid and the softmax fence).
GPU (`gpu`, Hopper): parity with the float32 device reference (tests/device_reference.py,
checked against the float64 one on CPU): mixed batches, junk entries and block table rows, NaN
in every unattended slot, empty rows, padding, NaN query rows, both layouts, several chunks,
FP8 caches with and without scalar scales, the variant knobs; and, at 16k tokens, "auto"
(bf16 and FP8; FP8 per-slot scales routed to the token kernels). The batch cases share one
shape, so cases of one spec share compiles.
"""
import dataclasses

import numpy as np
import pytest

import interop
from interop.testing import poison_unused_slots

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_sparse import dispatch, mosaic, mosaic_union  # noqa: E402

from .test_jax_mosaic import ON_HOPPER, _kernel_args, needs_hopper, needs_plgpu  # noqa: E402
from .test_jax_token import (_check, _device_reference, _garbage_topk, _problem,  # noqa: E402
                              _run)


# --- host-side logic (CPU) ---------------------------------------------------------------------

@pytest.mark.parametrize("group, expected", [
    (16, (8, 16, 4)), (4, (16, 8, 8)), (1, (16, 8, 8)), (24, (4, 24, 2)), (64, (2, 64, 1)),
    (12, (8, 16, 4))])
def test_tile_geometry(group, expected):
    tokens, moved, per_consumer = mosaic_union.tile_geometry(group)
    assert (tokens, moved, per_consumer) == expected
    assert tokens == interop.tiling.union_tile_tokens(group)
    assert per_consumer * moved <= mosaic.WGMMA_ROWS


def test_unsupported_reasons():
    spec = interop.SparseAttentionSpec(64, 4)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2):
        assert mosaic_union.unsupported_reason(spec, dtype) is None, dtype
    assert "per-slot" in mosaic_union.unsupported_reason(spec, jnp.float8_e4m3fn,
                                                         per_slot_scales=True)
    assert "GQA group of 128" in mosaic_union.unsupported_reason(
        interop.SparseAttentionSpec(128, 1), jnp.bfloat16)


def test_shared_memory_budget():
    assert mosaic_union.smem_bytes(mosaic_union.STAGES) <= mosaic.SMEM_BYTES
    assert mosaic_union.smem_bytes(mosaic_union.MAX_STAGES) <= mosaic.SMEM_BYTES
    assert mosaic_union.smem_bytes(mosaic_union.MAX_STAGES + 1) > mosaic.SMEM_BYTES
    assert mosaic_union.smem_bytes(mosaic_union.MAX_STAGES_FP8, fp8=True) <= mosaic.SMEM_BYTES
    assert mosaic_union.smem_bytes(mosaic_union.MAX_STAGES_FP8 + 1, fp8=True) > mosaic.SMEM_BYTES
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    args = (sds((16, 64, 128), jnp.bfloat16), sds(spec.physical_kv_cache_shape(8), jnp.bfloat16),
            sds((4, 16, 16), i32), sds((16,), i32), sds((16,), i32), sds((1, 8), i32))
    with pytest.raises(ValueError, match=r"num_stages 4 needs \d+ bytes of shared memory"):
        jax.eval_shape(lambda *a: mosaic_union.paged_sparse_attention_mosaic_union(
            spec, *a, num_stages=4), *args)
    fp8 = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype="fp8")
    args8 = (args[0], sds(fp8.physical_kv_cache_shape(8), jnp.float8_e4m3fn), *args[2:])
    with pytest.raises(ValueError, match=r"num_stages 3 needs \d+ bytes .* float8_e4m3fn"):
        jax.eval_shape(lambda *a: mosaic_union.paged_sparse_attention_mosaic_union(
            fp8, *a, num_stages=3), *args8)
    per_slot = sds((4, 8 * 128), jnp.float32)
    with pytest.raises(ValueError, match="per-slot k_scale"):
        jax.eval_shape(lambda *a: mosaic_union.paged_sparse_attention_mosaic_union(
            fp8, *a), *args8, per_slot, per_slot)


@pytest.mark.parametrize("group", [16, 4, 24, 1])
def test_row_table(rng, group):
    tokens, moved, per_consumer = mosaic_union.tile_geometry(group)
    positions = rng.integers(-1, 5000, (5, tokens)).astype(np.int32)
    table = np.asarray(mosaic_union.row_table(jnp.asarray(positions), moved=moved,
                                              per_consumer=per_consumer))
    assert table.shape == (5, mosaic_union.CONSUMERS, 2, mosaic.WGMMA_ROWS)
    for c in range(mosaic_union.CONSUMERS):
        for r in range(mosaic.WGMMA_ROWS):
            j = c * per_consumer + r // moved
            if r // moved < per_consumer and j < tokens:
                assert (table[:, c, 0, r] == positions[:, j]).all(), (c, r)
                assert (table[:, c, 1, r] == 1 << j).all(), (c, r)
            else:
                assert (table[:, c, 0, r] == -1).all() and (table[:, c, 1, r] == 0).all()


def _contract_keys(problem, owned):
    """{(token, kv_head, page, block, key)} the contract attends for the owned tokens."""
    md, bs = problem.metadata, problem.spec.block_size
    table, num_blocks = md.block_table, problem.kv_cache.shape[0]
    keys = set()
    for g in range(problem.topk_indices.shape[0]):
        for t in np.flatnonzero(owned):
            pos, req = int(md.token_positions[t]), int(md.token_to_req[t])
            for b in problem.topk_indices[g, t]:
                b = int(b)
                if not (0 <= b <= pos // bs and b < table.shape[1]):
                    continue
                page = int(table[req, b])
                if 0 <= page < num_blocks:
                    keys.update((t, g, page, b, j) for j in range(min(pos - b * bs + 1, bs)))
    return keys


def _kernel_keys(plan, group, n, bs):
    """The same set as the kernel's masks let it through: entry e < size of (head, tile),
    row r of consumer c attends key j when its bit is in the entry's bits and j <= position -
    block * bs. Also checks that no attended key lies past the entry's key count."""
    tokens, moved, per_consumer = mosaic_union.tile_geometry(group)
    size, page, block, bits, count, rows = (np.asarray(x) for x in (
        plan.size, plan.page, plan.block, plan.token_bits, plan.keys, plan.rows))
    keys = set()
    for g in range(size.shape[0]):
        for tile in range(size.shape[1]):
            for e in range(size[g, tile]):
                most = 0
                for c in range(mosaic_union.CONSUMERS):
                    for r in range(mosaic.WGMMA_ROWS):
                        position, bit = rows[tile, c, :, r]
                        if not bits[g, tile, e] & bit:
                            continue
                        last = min(position - block[g, tile, e] * bs, bs - 1)
                        token = tile * tokens + c * per_consumer + r // moved
                        assert token < n and r % moved < moved
                        if r % moved == 0:  # one row per token suffices for the set
                            keys.update((token, g, int(page[g, tile, e]),
                                         int(block[g, tile, e]), j) for j in range(last + 1))
                        most = max(most, last + 1)
                assert count[g, tile, e] == most, "V rows kept != keys some row attends"
    return keys


@pytest.mark.parametrize("heads, max_union", [((64, 4), None), ((8, 2), None),
                                              ((64, 4), 20), ((48, 2), 18)],
                         ids=["gqa16", "gqa4", "gqa16-capped", "gqa24-capped"])
def test_plan_chunk_masks_match_contract(rng, heads, max_union):
    problem = _problem(rng, heads=heads, topk=16, query_lens=[1, 1, 37, 24, 2],
                       seq_lens=[300, 900, 7000, 24, 14000], num_tokens=72, scatter=True,
                       future_fraction=0.4, empty_fraction=0.1, rho=0.8)
    problem.topk_indices = _garbage_topk(problem, rng)
    table = problem.metadata.block_table.copy()
    table[2, 0], table[3, 0] = problem.kv_cache.shape[0] + 5, -3
    problem.metadata = md = problem.metadata.replace(block_table=table)
    n, group = md.num_tokens, problem.spec.num_queries_per_kv
    mask = np.arange(n) >= 2  # the two decode rows go elsewhere
    plan = jax.jit(mosaic_union.plan_chunk, static_argnames=(
        "num_blocks", "block_size", "num_queries_per_kv", "max_union"))(
        jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
        jnp.asarray(md.token_positions), jnp.asarray(table), jnp.asarray(mask),
        num_blocks=problem.kv_cache.shape[0], block_size=128, num_queries_per_kv=group,
        max_union=max_union)
    owned, left = np.asarray(plan.owned) != 0, np.asarray(plan.left)
    assert not (owned & left).any() and ((owned | left) == mask).all()
    if max_union is None:
        assert not left.any()
    else:
        assert left.any() and owned.any(), "weak problem: no tile on each side of the cap"
        tokens = mosaic_union.tile_geometry(group)[0]
        full = np.asarray(mosaic_union.plan_union(
            jnp.asarray(problem.topk_indices), jnp.asarray(md.token_to_req),
            jnp.asarray(md.token_positions), jnp.asarray(table),
            num_blocks=problem.kv_cache.shape[0], block_size=128, tile_tokens=tokens, token_mask=jnp.asarray(mask)).size).max(0)
        assert (left == (mask & np.repeat(full > max_union, tokens)[:n])).all()
    got = _kernel_keys(plan, group, n, 128)
    want = _contract_keys(problem, owned)
    assert got == want, f"{len(got ^ want)} (token, head, page, block, key) differ"
    assert want, "weak problem: nothing attended"


def test_mosaic_prefill_path():
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16)
    big, small = interop.tiling.UNION_MIN_TOKENS, 512
    path = dispatch.mosaic_prefill_path
    assert path(spec, big, jnp.bfloat16, "auto") == "capped"
    assert path(spec, small, jnp.bfloat16, "auto") == "token"
    assert path(spec, small, jnp.bfloat16, "union") == "union"
    assert path(spec, big, jnp.float16, "token") == "token"
    assert path(spec, big, jnp.bfloat16, "k2q") == "token"
    assert path(spec, big, jnp.float8_e4m3fn, "union") == "union"
    assert path(spec, big, jnp.float8_e5m2, "auto") == "capped"
    # Per-slot FP8 scales: the token kernel.
    per_slot = jnp.ones((4, 8 * 128), jnp.float32)
    assert path(spec, big, jnp.float8_e4m3fn, "union", per_slot) == "token"
    assert path(spec, big, jnp.float8_e4m3fn, "auto", jnp.ones((1,), jnp.float32)) == "capped"
    assert dispatch.cache_class(jnp.float8_e5m2, per_slot) == "fp8-per-slot"
    # FP8 (scalar or no scale) goes to the Mosaic union kernel under "pallas" too; per-slot
    # scales stay on the Triton-backend union (HOPPER_AUTO).
    assert not dispatch.hopper_union(spec, jnp.float8_e4m3fn, False, per_slot)
    assert not dispatch.hopper_union(spec, jnp.float8_e4m3fn, True)  # interpreted
    assert dispatch.hopper_union(spec, jnp.float8_e4m3fn, False) == mosaic.mosaic_available()
    assert path(interop.SparseAttentionSpec(128, 1), big, jnp.bfloat16, "union") == "token"
    with pytest.raises(ValueError, match="prefill_algorithm 'tiles' is unknown"):
        path(spec, big, jnp.bfloat16, "tiles")
    assert dispatch.max_union(16, 16, dispatch.MOSAIC_UNION_MAX_SHARE) == \
        interop.tiling.max_union(16, 16, dispatch.MOSAIC_UNION_MAX_SHARE)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 13, 14, 99, 100])
def test_run_on_rows(rng, count):
    """The rows the union kernel leaves go to the token kernel on the smallest bucket that
    holds them (none: no launch); the other rows keep their values."""
    n = 100
    out = jnp.asarray(rng.standard_normal((n, 2, 3)), jnp.float32)
    rows = np.zeros(n, bool)
    rows[rng.choice(n, count, replace=False)] = True
    sizes = []

    def kernel(index):
        sizes.append(index.shape[0])
        return jnp.broadcast_to(index[:, None, None] + 1000.0, (index.shape[0], 2, 3))

    got = np.asarray(jax.jit(lambda r, o: dispatch.run_on_rows(kernel, r, o))(
        jnp.asarray(rows), out))
    want = np.where(rows[:, None, None], np.arange(n)[:, None, None] + 1000.0, np.asarray(out))
    assert np.array_equal(got, want)
    assert sizes == [2, 13, 100]  # shares 1/64, 1/8 and 1 of the rows, each traced once


@pytest.mark.skipif(ON_HOPPER, reason="Mosaic GPU can run here")
@pytest.mark.parametrize("algorithm", ["union", "auto"])
def test_forced_mosaic_union_without_hopper_says_why(rng, algorithm):
    problem = _problem(rng, num_tokens=interop.tiling.UNION_MIN_TOKENS
                       if algorithm == "auto" else None)
    with pytest.raises(RuntimeError, match='implementation="mosaic" cannot run here'):
        _run(problem, "mosaic", prefill_algorithm=algorithm)


FP8_CACHES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


@needs_plgpu
@pytest.mark.parametrize("heads, layout, dtype, cache, stages, pingpong, knobs", [
    ((64, 4), "NHD", "bfloat16", "auto", 2, True, {}),
    ((64, 4), "HND", "bfloat16", "auto", 2, True, {}),
    ((16, 1), "NHD", "float16", "auto", 2, True, {}),
    ((16, 1), "HND", "bfloat16", "auto", 3, True, {}),
    ((8, 2), "NHD", "bfloat16", "auto", 1, False, {}),
    ((48, 2), "HND", "float16", "auto", 2, False, {}),
    ((4, 4), "NHD", "bfloat16", "auto", 3, True, {}),
    ((128, 2), "HND", "bfloat16", "auto", 2, True, {}),
    ((64, 4), "NHD", "bfloat16", "auto", 2, True, {"programs": 7}),
    ((16, 1), "HND", "bfloat16", "fp8_e4m3", 2, True, {"programs": 132}),
    ((64, 4), "HND", "bfloat16", "auto", 2, True, {"softmax_fence": True}),
    ((64, 4), "NHD", "bfloat16", "fp8_e4m3", 2, True, {"programs": 132, "softmax_fence": True}),
    ((64, 4), "NHD", "bfloat16", "fp8_e4m3", 2, True, {}),
    ((64, 4), "HND", "bfloat16", "fp8_e4m3", 2, True, {}),
    ((64, 4), "NHD", "float16", "fp8_e5m2", 2, True, {}),
    ((64, 4), "HND", "bfloat16", "fp8_e5m2", 1, False, {}),
    ((16, 1), "NHD", "float16", "fp8_e4m3", 2, False, {}),
    ((48, 2), "HND", "bfloat16", "fp8_e5m2", 2, True, {}),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else
       "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_union_lowers_for_cuda(heads, layout, dtype, cache, stages, pingpong, knobs):
    """The real kernel (with its chunk plan and the aliased output) lowers through Pallas'
    Mosaic GPU backend for CUDA, no GPU needed: 16-bit and FP8 caches (scalar scales) in
    both layouts, with the variant knobs (a persistent grid, the softmax fence)."""
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    cache_dtype = FP8_CACHES.get(cache, jnp.dtype(dtype))
    args = (sds((40, heads[0], 128), jnp.dtype(dtype)),
            sds(spec.physical_kv_cache_shape(40), cache_dtype),
            sds((heads[1], 40, 16), i32), sds((40,), i32), sds((40,), i32), sds((2, 20), i32))
    if cache in FP8_CACHES:
        args += (sds((1,), jnp.float32),) * 2

    def call(*a):
        return mosaic_union.paged_sparse_attention_mosaic_union(
            spec, *a, max_union=24, num_stages=stages, pingpong=pingpong, chunk_tokens=24,
            **knobs)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1, "no Mosaic GPU kernel in the CUDA lowering"
    assert "output_operand_alias" in text, "the output is not aliased in place"


@needs_plgpu
@pytest.mark.parametrize("cache, scale_mode", [("auto", "none"), ("fp8_e4m3", "scalar"),
                                               ("fp8_e5m2", "per_slot")])
def test_hopper_auto_lowers_for_cuda(monkeypatch, cache, scale_mode):
    """The default implementation's "auto" as it runs on Hopper (`HOPPER_AUTO`): the Mosaic
    union kernel (16-bit, FP8 with a scalar scale) beside the Triton-backend token kernel,
    or (per-slot FP8 scales) the Triton-backend union; lowered for CUDA."""
    monkeypatch.setattr(mosaic, "mosaic_available", lambda: True)
    spec = interop.SparseAttentionSpec(64, 4, topk_blocks=16, kv_cache_dtype=cache)
    n = interop.tiling.UNION_MIN_TOKENS
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    dtype = FP8_CACHES.get(cache, jnp.bfloat16)
    args = [sds((n, 64, 128), jnp.bfloat16), sds(spec.physical_kv_cache_shape(64), dtype),
            sds((4, n, 16), i32), sds((n,), i32), sds((n,), i32), sds((4, 64), i32)]
    args += {"none": [None, None], "scalar": [sds((1,), jnp.float32)] * 2,
             "per_slot": [sds((4, 64 * 128), jnp.float32)] * 2}[scale_mode]

    def call(*a):
        return dispatch.sparse_attention_pallas(spec, *a, num_decode_tokens=jnp.int32(3),
                                                interpret=False)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    mosaic_union_kernel = "sparse_attention_mosaic_union" in text
    assert mosaic_union_kernel == (scale_mode != "per_slot"), (cache, scale_mode)
    assert "triton" in text.lower(), "no Triton-backend kernel beside it"


# --- GPU: compiled Mosaic GPU kernels ---------------------------------------------------------

# The GPU batch cases' shared batch: decodes and prefill chunks (tiles straddling requests),
# padding rows.
UNION_BATCH = dict(query_lens=[1] * 3 + [150, 61, 9], seq_lens=[9000, 129, 2000, 4400, 300, 9],
                   num_tokens=240)
# GQA groups 16 (M3's two head shapes), 4 and 24: their tile geometries; M3's 64/4 in both
# layouts (with one KV head, NHD and HND are the same memory).
UNION_ROWS = [((64, 4), "NHD"), ((64, 4), "HND"), ((16, 1), "NHD"), ((8, 2), "HND"),
              ((48, 2), "NHD")]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("heads, layout", UNION_ROWS,
                         ids=[f"{h[0]}-{h[1]}-{layout}" for h, layout in UNION_ROWS])
def test_gpu_union_mixed_batch_poisoned(rng, heads, layout):
    """Decodes and prefill chunks (tiles straddling requests), junk top-k entries and block
    table rows, empty rows, padding rows; every slot no token may attend holds NaN."""
    problem = _problem(rng, "auto", layout, heads, topk=16, **UNION_BATCH, scatter=True,
                       future_fraction=0.2, empty_fraction=0.05, rho=0.87)
    problem.topk_indices = _garbage_topk(problem, rng)
    poisoned = dataclasses.replace(problem)
    poison_unused_slots(poisoned)
    table = problem.metadata.block_table.copy()
    table[0, 0], table[3, 1], table[2, 4] = problem.kv_cache.shape[0] + 5, -3, 2**31 - 1
    problem.metadata = problem.metadata.replace(block_table=table)
    ref = _device_reference(problem)
    problem.kv_cache = poisoned.kv_cache
    _check(_run(problem, "mosaic", prefill_algorithm="union"), ref,
           f"mosaic union {heads} {layout}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cache, scale_mode, query_dtype, layout", [
    ("fp8_e4m3", "scalar", "bfloat16", "NHD"), ("fp8_e4m3", "none", "float16", "HND"),
    ("fp8_e5m2", "scalar", "float16", "HND"), ("fp8_e5m2", "none", "bfloat16", "NHD")])
def test_gpu_union_fp8_poisoned(rng, cache, scale_mode, query_dtype, layout):
    """FP8 pages dequantized by the producer: the mixed batch of
    test_gpu_union_mixed_batch_poisoned (junk top-k and block tables, NaN in every slot no
    token may attend: FP8 NaN too) at 64/4 and 16/1, scalar scales folded in."""
    for heads in [(64, 4), (16, 1)]:
        problem = _problem(rng, cache, layout, heads, topk=16, **UNION_BATCH, scatter=True,
                           future_fraction=0.2,
                           empty_fraction=0.05, rho=0.87, scale_mode=scale_mode,
                           query_dtype=query_dtype)
        problem.topk_indices = _garbage_topk(problem, rng)
        poisoned = dataclasses.replace(problem)
        poison_unused_slots(poisoned)
        table = problem.metadata.block_table.copy()
        table[0, 0], table[3, 1] = problem.kv_cache.shape[0] + 5, -3
        problem.metadata = problem.metadata.replace(block_table=table)
        ref = _device_reference(problem)
        problem.kv_cache = poisoned.kv_cache
        label = f"mosaic union {cache} {scale_mode} {query_dtype} {layout} {heads}"
        _check(_run(problem, "mosaic", prefill_algorithm="union"), ref, label)
        spec, *args = _kernel_args(problem)  # the kernel alone, persistent
        out, left = mosaic_union.paged_sparse_attention_mosaic_union(
            spec, *args, token_mask=jnp.arange(problem.query.shape[0]) >= 3, programs=16)
        prefill = np.arange(problem.query.shape[0]) >= 3
        assert not np.asarray(left).any()
        _check(np.asarray(out, np.float64)[prefill], ref[prefill], label + " persistent")


@pytest.mark.gpu
@needs_hopper
def test_gpu_fp8_per_slot_routes_to_token_kernel(rng):
    """Per-slot scales do not fold: "union" and "auto" run them on the token kernels, and
    the answer is the reference's."""
    n = interop.tiling.UNION_MIN_TOKENS
    problem = _problem(rng, "fp8_e4m3", "NHD", (64, 4), topk=16, query_lens=[1, n - 1],
                       seq_lens=[3000, n + 500], rho=0.87, scale_mode="per_slot")
    reference = _device_reference(problem)
    assert not dispatch.hopper_union(problem.spec, jnp.float8_e4m3fn, None,
                                     jnp.asarray(problem.k_scale))
    for impl, algorithm in [("mosaic", "union"), ("mosaic", "auto"), ("pallas", "auto")]:
        _check(_run(problem, impl, prefill_algorithm=algorithm), reference,
               f"{impl} {algorithm} FP8 per-slot")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cache", ["float16", "auto"])
def test_gpu_union_nan_query_rows_and_empty_rows(rng, cache):
    """A NaN / Inf query row that attends a key gives NaN; one that attends nothing gives
    zeros; no other row changes (contract, 5). The expected rows: the device reference of the
    clean query, with the non-finite rows that attend a key (a nonzero clean row) NaN."""
    problem = _problem(rng, cache, "HND", (64, 4), topk=16, **UNION_BATCH, scatter=True,
                       empty_fraction=0.2, rho=0.87)
    ref = _device_reference(problem).astype(np.float64)
    q = problem.query.astype(np.float32)
    nonfinite = np.zeros(q.shape[:2], bool)
    for (t, h, d), value in [((5, 3, 7), np.nan), ((70, 20, 0), np.inf),
                             ((130, 60, 100), np.nan), ((231, 9, 3), np.nan)]:
        q[t, h, d], nonfinite[t, h] = value, True
    problem.query = q.astype(problem.query.dtype)
    ref[nonfinite & ref.any(-1)] = np.nan
    out = np.asarray(_run(problem, "mosaic", prefill_algorithm="union"), np.float64)
    bad = np.isnan(ref)
    assert bad.any(), "weak problem: no NaN row attends a key"
    assert not ref[231, 9].any(), "weak problem: the padding row's NaN attends a key"
    assert (np.isnan(out) == bad).all(), "NaN rows differ from the reference's"
    _check(np.where(bad, 0, out), np.where(bad, 0, ref), f"mosaic union {cache} NaN rows")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("stages, pingpong, chunk, programs, fence", [
    (1, True, None, None, False), (3, True, 40, None, False), (2, False, 24, None, False),
    (3, False, None, None, False), (2, True, None, 5, False), (1, True, 40, 3, True),
    (3, False, None, 132, False), (2, True, 24, None, True)])
def test_gpu_union_pipeline_and_chunks(rng, stages, pingpong, chunk, programs, fence):
    """Ring depths 1-3, with and without ping-pong and the softmax fence, one program per
    item or persistent;
    chunks of 24 / 40 tokens (the last one overlapping the one before); a cap leaving some
    tiles out (their rows keep `out`)."""
    problem = _problem(rng, "auto", "NHD", (16, 1), topk=16, query_lens=[1, 130, 70],
                       seq_lens=[5000, 3000, 900], scatter=True, future_fraction=0.2,
                       empty_fraction=0.05, rho=0.87)
    spec, *args = _kernel_args(problem)
    n = problem.query.shape[0]
    mask = jnp.arange(n) >= 1
    sentinel = jnp.full(problem.query.shape, 7.0, problem.query.dtype)
    out, left = mosaic_union.paged_sparse_attention_mosaic_union(
        spec, *args[:6], token_mask=mask, max_union=20, out=sentinel, num_stages=stages,
        pingpong=pingpong, programs=programs, softmax_fence=fence, chunk_tokens=chunk)
    out, left = np.asarray(out, np.float64), np.asarray(left)
    ref = _device_reference(problem)
    done = np.asarray(mask) & ~left
    assert left.any() and done.any(), "weak problem: no tile on each side of the cap"
    assert (out[~done] == 7.0).all(), "rows outside the kernel's tiles were written"
    _check(out[done], ref[done],
           f"mosaic union stages={stages} pingpong={pingpong} programs={programs} "
           f"fence={fence}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cache", ["auto", "fp8_e4m3"])
def test_gpu_auto_16k_against_device_reference(rng, cache):
    """"auto" at UNION_MIN_TOKENS tokens (decodes first): small-union tiles on the union
    kernel, the rest and the decodes on the token kernel. One layout: the batch cases above
    cover both at 240 tokens, and each layout here is two more large compiles."""
    layout = "HND"
    n = interop.tiling.UNION_MIN_TOKENS
    problem = _problem(rng, cache, layout, (64, 4), topk=16, query_lens=[1] * 4 + [n - 4],
                       seq_lens=[9000, 129, 2000, 300, n + 1000], rho=0.87,
                       scale_mode="scalar" if cache != "auto" else "none")
    reference = _device_reference(problem)
    out = _run(problem, "mosaic", prefill_algorithm="auto")
    _check(out, reference, f"mosaic auto 16k {layout} {cache}")
    # The default implementation on Hopper: the Mosaic union kernel for small-union tiles,
    # the Triton-backend token kernel for the other rows (dispatch.hopper_union).
    assert dispatch.hopper_union(problem.spec, problem.kv_cache.dtype, None)
    out = _run(problem, "pallas", prefill_algorithm="auto")
    _check(out, reference, f"pallas auto 16k {layout} {cache} (Mosaic union tiles)")
