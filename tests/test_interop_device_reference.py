"""The GPU tests' float32 device references (tests/device_reference.py) against the float64
reference on CPU cases: a wrong device reference fails here, in CI, not only on a GPU."""
import numpy as np
import pytest

import interop
from interop.testing import (matching_query_dtype, poison_unused_slots, random_problem,
                             relative_error)
from tests.device_reference import jax_reference, torch_reference
from tests.helpers import garbage_block_table, garbage_topk

# Float32 sums of at most topk * 128 terms against float64: about 1e-7 relative; a masking
# or scaling mistake is of order 1.
TOL = 1e-5
# (heads, cache, layout, scale_mode, decode_query_len)
CASES = [((8, 2), "auto", "NHD", "none", 1), ((16, 1), "float16", "HND", "none", 2),
         ((8, 2), "fp8_e4m3", "HND", "per_slot", 1), ((16, 1), "fp8_e5m2", "NHD", "scalar", 1)]


def _problem(rng, heads, cache, layout, scale_mode, decode_query_len):
    """Decodes (one at a block edge), prefills with and without context, padding tokens;
    sentinels anywhere in a row, future blocks, empty rows."""
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=4, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    lens = decode_query_len
    query_lens = [lens] * 3 + [20, 9]
    return random_problem(spec, query_lens, [300, 128 + lens, 600, 540, 9], rng,
                          decode_query_len=lens, query_dtype=matching_query_dtype(cache),
                          scale_mode=scale_mode, num_tokens=sum(query_lens) + 3, scatter=True,
                          future_fraction=0.3, empty_fraction=0.1)


def _check(got, ref, label):
    assert got.dtype == np.float32 and got.shape == ref.shape, f"{label}: {got.dtype} {got.shape}"
    err = relative_error(got, ref)
    assert err < TOL, f"{label}: relative error {err:.3g} against float64 (limit {TOL})"
    zero = ~ref.any(axis=(1, 2))
    assert zero.any() and not got[zero].any(), f"{label}: rows with no valid entry not zeros"


def _args(problem):
    return (problem.spec, problem.query, problem.kv_cache, problem.topk_indices,
            problem.metadata, problem.k_scale, problem.v_scale)


@pytest.mark.parametrize("heads, cache, layout, scale_mode, decode_query_len", CASES,
                         ids=lambda v: str(v))
def test_jax_reference_matches_float64(rng, heads, cache, layout, scale_mode, decode_query_len):
    pytest.importorskip("jax")
    problem = _problem(rng, heads, cache, layout, scale_mode, decode_query_len)
    ref = interop.reference_attention(*_args(problem))
    label = f"jax {heads} {cache} {layout} {scale_mode} L={decode_query_len}"
    _check(jax_reference(*_args(problem)), ref, label)
    # Slots no token may attend hold NaN: the gathered tail of a page must not leak in.
    poison_unused_slots(problem)
    _check(jax_reference(*_args(problem)), ref, label + " poisoned")
    # Junk top-k entries and block-table entries outside the cache (the GPU garbage cases).
    problem.topk_indices = garbage_topk(problem, rng)
    problem.metadata = garbage_block_table(problem)
    _check(jax_reference(*_args(problem)), interop.reference_attention(*_args(problem)),
           label + " junk entries")


@pytest.mark.parametrize("heads, cache, layout, scale_mode, decode_query_len", CASES,
                         ids=lambda v: str(v))
def test_torch_reference_matches_float64(rng, heads, cache, layout, scale_mode,
                                         decode_query_len):
    pytest.importorskip("torch")
    problem = _problem(rng, heads, cache, layout, scale_mode, decode_query_len)
    ref = interop.reference_attention(*_args(problem))
    _check(torch_reference(*_args(problem)), ref,
           f"torch {heads} {cache} {layout} {scale_mode} L={decode_query_len}")
