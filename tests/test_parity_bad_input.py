"""The README's bad-input table, checked row by row in both front ends (contract section 5).

Each row of the table names a case and, per front end, the outcome as its first code span
(`nan_row`, `zeros`, `ValueError`, ...). Every case below runs the mistake through the front
end's default path on one small batch and reports what happened in the same words; the test
fails when the table and the library disagree, or when a case has no row (or a row no case).
The per-path versions of these cases (every implementation and prefill algorithm) are in
tests/test_torch_bad_input.py and tests/test_jax_bad_input.py.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import interop
from interop.testing import random_problem

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import jax_sparse  # noqa: E402
import torch_sparse  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SPEC = interop.SparseAttentionSpec(num_heads=4, num_kv_heads=1, topk_blocks=4)


def readme_table() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    body = text.split("<!-- bad-input-table: begin -->")[1].split("<!-- bad-input-table: end -->")[0]
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        spans = [re.findall(r"`([^`]+)`", c) for c in cells]
        rows[spans[0][0]] = (spans[1][0], spans[2][0])
    return rows


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    # One decode (200 tokens) and one prefill of 3 tokens after 130: positions 199, 130-132.
    return random_problem(SPEC, [1, 3], [200, 133], rng)


def _torch_out(p, query=None, topk=None, cache=None):
    md = interop.to_torch(p.metadata)
    view = interop.kv_cache_to_torch(p.kv_cache if cache is None else cache, SPEC)
    q = torch.from_numpy(np.asarray(p.query if query is None else query, np.float32)).to(
        torch.bfloat16)
    tk = torch.from_numpy(np.asarray(p.topk_indices if topk is None else topk))
    return torch_sparse.sparse_attention(SPEC, q, view, tk, md).float().numpy()


def _jax_out(p, query=None, topk=None, cache=None):
    q = jnp.asarray(np.asarray(p.query if query is None else query, np.float32), jnp.bfloat16)
    out = jax_sparse.sparse_attention(
        SPEC, q, jnp.asarray(p.kv_cache if cache is None else cache),
        jnp.asarray(p.topk_indices if topk is None else topk), interop.to_jax(p.metadata))
    return np.asarray(out, np.float32)


RUN = {"torch": _torch_out, "jax": _jax_out}


def _rows_outcome(out, base, rows):
    """`nan_row` when exactly `rows` (token, head) became NaN and the rest is unchanged,
    `zeros` when those rows are zeros, `unchanged` when nothing moved."""
    others = np.ones(out.shape[:2], bool)
    for t, h in rows:
        others[t, h] = False
    if not np.allclose(out[others], base[others], rtol=1e-2, atol=1e-2):
        return "other_rows_changed"
    sel = out[~others]
    if sel.size and np.isnan(sel).all():
        return "nan_row"
    if sel.size and (sel == 0).all():
        return "zeros"
    if np.allclose(out, base, rtol=1e-2, atol=1e-2, equal_nan=False):
        return "unchanged"
    return "other"


def _raised(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as err:
        return type(err).__name__
    return "no_error"


def case_nan_query(fw):
    p = _problem()
    base = RUN[fw](p)
    q = p.query.astype(np.float32)
    q[2, 1] = np.nan
    q[3, 0, 5] = np.inf
    return _rows_outcome(RUN[fw](p, query=q), base, [(2, 1), (3, 0)])


def case_nan_query_empty_row(fw):
    p = _problem()
    topk = p.topk_indices.copy()
    topk[:, 2] = -1
    base = RUN[fw](p, topk=topk)
    q = p.query.astype(np.float32)
    q[2] = np.nan
    return _rows_outcome(RUN[fw](p, query=q, topk=topk), base, [(2, h) for h in range(4)])


def case_nan_unattended_slot(fw):
    p = _problem()
    base = RUN[fw](p)
    interop.testing.poison_unused_slots(p)
    return _rows_outcome(RUN[fw](p), base, [])


def case_nan_attended_slot(fw):
    p = _problem()
    topk = p.topk_indices.copy()
    topk[0, 1:] = -1
    topk[0, 1:, 0] = 0            # prefill tokens attend block 0 only
    base = RUN[fw](p, topk=topk)
    cache = p.kv_cache.astype(np.float32)
    page = p.metadata.block_table[1, 0]
    cache[page, 0, 7] = np.nan    # K of key 7 of the prefill's block 0 (NHD)
    out = RUN[fw](p, topk=topk, cache=cache.astype(p.kv_cache.dtype))
    return _rows_outcome(out, base, [(t, h) for t in (1, 2, 3) for h in range(4)])


def case_duplicate_entry(fw):
    p = _problem()
    topk = p.topk_indices.copy()
    topk[0, :, 2:] = -1
    topk[0, :, :2] = [0, 1]       # every token sees blocks 0 and 1 (positions >= 130)
    once = RUN[fw](p, topk=topk)
    topk[0, :, 2] = 0             # block 0 twice: counted twice it would outweigh block 1
    twice = RUN[fw](p, topk=topk)
    return "counted_once" if np.allclose(once, twice, rtol=1e-3, atol=1e-3) else "counted_twice"


def case_invalid_entry(fw):
    p = _problem()
    topk = p.topk_indices.copy()
    topk[0, :, 1:] = -1
    topk[0, :, 0] = 0
    base = RUN[fw](p, topk=topk)
    topk[0, :, 1] = 3             # a block past every token's position
    topk[0, :, 2] = 1 << 20       # past the block table
    topk[0, 0, 3] = 2             # a future block for the decode (position 199)
    return "skipped" if np.allclose(RUN[fw](p, topk=topk), base, rtol=1e-3, atol=1e-3) \
        else "attended"


def _write(fw, p, slots, cache=None):
    key = p.key.astype(np.float32)
    value = p.value.astype(np.float32)
    cache = p.kv_cache if cache is None else cache
    if fw == "torch":
        view = interop.kv_cache_to_torch(cache.copy(), SPEC)
        torch_sparse.write_kv(view, torch.from_numpy(key).to(torch.bfloat16),
                              torch.from_numpy(value).to(torch.bfloat16),
                              torch.from_numpy(np.asarray(slots, np.int64)), SPEC)
        return view.permute(*SPEC.kv_cache_stride_order()).float().numpy()
    out = jax_sparse.write_kv(jnp.asarray(cache), jnp.asarray(key, jnp.bfloat16),
                              jnp.asarray(value, jnp.bfloat16), jnp.asarray(slots), SPEC)
    return np.asarray(out, np.float32)


def case_negative_slot(fw):
    p = _problem()
    slots = p.metadata.slot_mapping.copy()
    slots[1] = -1
    before = np.moveaxis(p.kv_cache.astype(np.float32), 2, 1)   # (page, slot, K/V, ...): NHD
    after = np.moveaxis(_write(fw, p, slots), 2, 1)
    written = np.zeros(after.shape[:2], bool)
    for s in slots[slots >= 0]:
        written[s // 128, s % 128] = True
    return "skipped" if np.array_equal(after[~written], before[~written]) else "written"


def case_slot_past_cache(fw):
    p = _problem()
    slots = p.metadata.slot_mapping.copy()
    slots[2] = p.kv_cache.shape[0] * 128 + 5
    return _raised(lambda: _write(fw, p, slots))


def case_short_slot_mapping(fw):
    p = _problem()
    return _raised(lambda: _write(fw, p, p.metadata.slot_mapping[:-1]))


def case_long_slot_mapping(fw):
    p = _problem()
    exact = _write(fw, p, p.metadata.slot_mapping)
    longer = np.concatenate([p.metadata.slot_mapping, [0, 1]])
    return "ignored" if np.array_equal(_write(fw, p, longer), exact) else "used"


def case_narrow_block_table(fw):
    p = _problem()
    md = p.metadata.replace(block_table=p.metadata.block_table[:, :1])
    md = interop.to_torch(md) if fw == "torch" else interop.to_jax(md)
    return _raised(lambda: interop.validate_metadata(md, p.kv_cache.shape[0]))


def case_wrong_dtype(fw):
    p = _problem()
    q32 = p.query.astype(np.float32)
    if fw == "torch":
        return _raised(lambda: torch_sparse.sparse_attention(
            SPEC, torch.from_numpy(q32), interop.kv_cache_to_torch(p.kv_cache, SPEC),
            torch.from_numpy(p.topk_indices), interop.to_torch(p.metadata)))
    return _raised(lambda: jax_sparse.sparse_attention(
        SPEC, jnp.asarray(q32), jnp.asarray(p.kv_cache), jnp.asarray(p.topk_indices),
        interop.to_jax(p.metadata)))


def case_wrong_shape(fw):
    p = _problem()
    q = p.query[:, :3]
    if fw == "torch":
        return _raised(lambda: torch_sparse.sparse_attention(
            SPEC, torch.from_numpy(q.astype(np.float32)).to(torch.bfloat16),
            interop.kv_cache_to_torch(p.kv_cache, SPEC), torch.from_numpy(p.topk_indices),
            interop.to_torch(p.metadata)))
    return _raised(lambda: jax_sparse.sparse_attention(
        SPEC, jnp.asarray(q), jnp.asarray(p.kv_cache), jnp.asarray(p.topk_indices),
        interop.to_jax(p.metadata)))


def case_other_framework_array(fw):
    p = _problem()
    if fw == "torch":
        call = lambda: torch_sparse.sparse_attention(  # noqa: E731
            SPEC, jnp.asarray(p.query), interop.kv_cache_to_torch(p.kv_cache, SPEC),
            torch.from_numpy(p.topk_indices), interop.to_jax(p.metadata))
        bridge = "interop.to_torch"
    else:
        call = lambda: jax_sparse.sparse_attention(  # noqa: E731
            SPEC, torch.from_numpy(p.query.astype(np.float32)).to(torch.bfloat16),
            jnp.asarray(p.kv_cache), jnp.asarray(p.topk_indices), interop.to_torch(p.metadata))
        bridge = "interop.to_jax"
    try:
        call()
    except TypeError as err:
        return "TypeError" if bridge in str(err) else f"TypeError without {bridge}"
    except Exception as err:  # noqa: BLE001 - the table says what it should be
        return type(err).__name__
    return "no_error"


def case_write_into_other_framework_cache(fw):
    p = _problem()
    if fw == "torch":
        # A JAX-owned cache viewed from PyTorch: PyTorch writes its buffer.
        owned = jnp.asarray(p.kv_cache)
        view = interop.kv_cache_to_torch(owned, SPEC)
        before = view.data_ptr()
        torch_sparse.write_kv(view, torch.from_numpy(p.key.astype(np.float32)).to(torch.bfloat16),
                              torch.from_numpy(p.value.astype(np.float32)).to(torch.bfloat16),
                              torch.from_numpy(p.metadata.slot_mapping), SPEC)
        s = int(p.metadata.slot_mapping[0])
        seen = np.asarray(owned, np.float32)[s // 128, 0, s % 128]
        same = view.data_ptr() == before == owned.unsafe_buffer_pointer()
        return "in_place" if same and np.array_equal(seen, p.key[0].astype(np.float32)) \
            else "copy"
    tview = interop.kv_cache_to_torch(p.kv_cache.copy(), SPEC).clone()
    shared = interop.kv_cache_to_jax(tview, SPEC)
    outcome = _raised(lambda: jax_sparse.write_kv(
        shared, jnp.asarray(p.key), jnp.asarray(p.value), jnp.asarray(p.metadata.slot_mapping),
        SPEC))
    if outcome == "ValueError" and shared.is_deleted():
        return "ValueError after consuming the cache"
    return outcome


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def test_every_case_has_a_row_and_every_row_a_case():
    assert sorted(readme_table()) == sorted(CASES)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_readme_table_matches_what_happens(case, framework):
    expected = readme_table()[case][0 if framework == "torch" else 1]
    got = CASES[case](framework)
    assert got == expected, f"{case} in {framework}: README says {expected!r}, library gives {got!r}"
