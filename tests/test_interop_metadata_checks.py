"""The core's host-side checks: `validate_metadata`, fixed-shape `build_metadata`, and the
registry of JAX arrays that alias PyTorch storage (contract section 5)."""
import numpy as np
import pytest

import interop

BS = 128


def _batch(**kw):
    # One decode (5 tokens of context) and one prefill of 3 tokens reaching position 129.
    return interop.build_metadata([1, 3], [5, 130], np.array([[2, 0], [3, 4]]), block_size=BS,
                                  **kw)


def test_validate_metadata_accepts_a_built_batch():
    md = _batch(num_blocks=5)
    assert interop.validate_metadata(md, 5) is md


@pytest.mark.parametrize("flavour", ["numpy", "torch", "jax"])
def test_validate_metadata_rejects_a_narrowed_table_in_every_flavour(flavour):
    md = _batch()
    narrow = md.replace(block_table=md.block_table[:, :1])
    if flavour == "torch":
        pytest.importorskip("torch")
        narrow = interop.to_torch(narrow)
    elif flavour == "jax":
        pytest.importorskip("jax")
        narrow = interop.to_jax(narrow)
    with pytest.raises(ValueError, match=r"request 1: seq_lens\[1\] = 130 needs 2 blocks"):
        interop.validate_metadata(narrow, 5)


def test_validate_metadata_rejects_pages_and_slots_past_the_cache():
    md = _batch()
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 4 is outside \[0, 4\)"):
        interop.validate_metadata(md, 4)
    slots = md.slot_mapping.copy()
    slots[2] = 5 * BS
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 640 is past the cache"):
        interop.validate_metadata(md.replace(slot_mapping=slots), 5)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        interop.validate_metadata(md, 0)


def test_build_metadata_checks_pages_when_given_num_blocks():
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 99 is outside \[0, 10\)"):
        interop.build_metadata([1], [5], np.array([[99]]), num_blocks=10)


def test_fixed_shapes_pad_requests_tokens_and_table_without_changing_the_batch():
    md = _batch()
    fixed = _batch(num_reqs=4, max_blocks=3, num_tokens=6)
    assert fixed.block_table.shape == (4, 3) and fixed.slot_mapping.shape == (6,)
    assert fixed.seq_lens.shape == (4,) and fixed.query_start_loc.shape == (5,)
    n = md.num_tokens
    for field in ("slot_mapping", "token_positions", "token_to_req"):
        np.testing.assert_array_equal(getattr(fixed, field)[:n], getattr(md, field), field)
    np.testing.assert_array_equal(fixed.slot_mapping[n:], -1)
    np.testing.assert_array_equal(fixed.token_positions[n:], -1)
    np.testing.assert_array_equal(fixed.block_table[:2, :2], md.block_table)
    assert (fixed.num_decodes, fixed.num_prefills) == (1, 3)
    assert fixed.num_actual_tokens == md.num_actual_tokens
    interop.validate_metadata(fixed, 5)
    with pytest.raises(ValueError, match="smaller than the batch"):
        _batch(num_reqs=1)


def test_imported_from_torch_marks_exactly_the_aliasing_arrays():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    from interop.bridges import imported_from_torch
    spec = interop.SparseAttentionSpec(num_heads=2, num_kv_heads=1)
    cache = interop.allocate_torch_kv_cache(spec, 2, torch.bfloat16)
    shared = interop.kv_cache_to_jax(cache, spec)
    assert imported_from_torch(shared)
    assert shared.unsafe_buffer_pointer() == cache.data_ptr()
    assert imported_from_torch(interop.to_jax(torch.zeros(3)))
    assert not imported_from_torch(interop.to_jax(torch.zeros(3), copy=True))
    assert not imported_from_torch(jnp.zeros(3))
    assert not imported_from_torch(interop.to_jax(np.zeros(3)))
