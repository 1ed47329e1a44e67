"""Cross-framework parity of an M3 sparse layer end to end: one framework writes the K/V cache
and the index-K side cache, both caches cross the DLPack bridges without a copy, each
framework's indexer selects blocks on the shared index cache (exactly the float64 reference's
rows), and each framework's attention attends the other framework's selection on the shared
KV cache (against the float64 reference)."""
import numpy as np
import pytest

import interop
from interop.indexer import IndexerSpec
from interop.testing import NUMPY_DTYPES, random_block_table, relative_error

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import jax_sparse  # noqa: E402
import torch_sparse  # noqa: E402

TOL = 1e-2  # bf16 queries and P in the attention's dot products


def _write(writer, spec, ispec, num_blocks, slots, key, value, index_key, tdev):
    """(torch KV view, jax physical KV, torch index cache, jax index cache, zero_copy): every
    slot of `slots` written by `writer` into fresh caches, shared with the other framework."""
    qdtype = str(key.dtype)
    if writer == "torch":
        t_kv = interop.allocate_torch_kv_cache(spec, num_blocks, qdtype, device=tdev)
        torch_sparse.write_kv(t_kv, interop.to_torch(key, tdev), interop.to_torch(value, tdev),
                              interop.to_torch(slots, tdev), spec)
        t_idx = torch.full(ispec.index_cache_shape(num_blocks), float("nan"), device=tdev,
                           dtype=getattr(torch, ispec.cache_storage_dtype(qdtype)))
        torch_sparse.write_index_k(t_idx, interop.to_torch(index_key, tdev),
                                   interop.to_torch(slots, tdev), ispec)
        j_kv, j_idx = interop.kv_cache_to_jax(t_kv, spec), interop.to_jax(t_idx)
    else:
        j_kv = jax_sparse.write_kv(jax_sparse.allocate_kv_cache(spec, num_blocks,
                                                                dtype=jnp.dtype(qdtype)),
                                   jnp.asarray(key), jnp.asarray(value), jnp.asarray(slots), spec)
        j_idx = jnp.full(ispec.index_cache_shape(num_blocks), jnp.nan,
                         jnp.dtype(ispec.cache_storage_dtype(qdtype)))
        j_idx = jax_sparse.write_index_k(j_idx, jnp.asarray(index_key), jnp.asarray(slots), ispec)
        t_kv, t_idx = interop.kv_cache_to_torch(j_kv, spec), interop.to_torch(j_idx)
    zero_copy = (j_kv.unsafe_buffer_pointer() == t_kv.data_ptr()
                 and j_idx.unsafe_buffer_pointer() == t_idx.data_ptr())
    return t_kv, j_kv, t_idx, j_idx, zero_copy


def _layer_parity(rng, spec, ispec, query_lens, seq_lens, writer, jax_indexer, device):
    tdev = torch.device(device)
    num_tokens = sum(query_lens) + 1                                 # one padding token
    table, num_blocks = random_block_table(seq_lens, rng)
    md = interop.build_metadata(query_lens, seq_lens, table, num_blocks=num_blocks,
                                num_tokens=num_tokens)
    # The whole context at once: every slot of every request (positions 0 .. seq - 1).
    full = interop.build_metadata(seq_lens, seq_lens, table, num_blocks=num_blocks)
    bf16 = NUMPY_DTYPES["bfloat16"]
    m, n = full.num_tokens, md.num_tokens
    heads, kv_heads, index_heads = spec.num_heads, spec.num_kv_heads, ispec.num_index_heads
    key, value = (rng.standard_normal((m, kv_heads, 128), np.float32).astype(bf16)
                  for _ in range(2))
    # Small integers: exact dot products in every precision, and ties among block scores.
    index_key = rng.integers(-2, 3, (m, 128)).astype(bf16)
    query = rng.standard_normal((n, heads, 128), np.float32).astype(bf16)
    index_query = rng.integers(-2, 3, (n, index_heads, 128)).astype(bf16)

    t_kv, j_kv, t_idx, j_idx, zero_copy = _write(writer, spec, ispec, num_blocks,
                                                 full.slot_mapping, key, value, index_key, tdev)
    label = f"{writer} writes, index cache {ispec.index_cache_dtype}, jax {jax_indexer}"
    assert zero_copy, f"{label}: a cache crossed frameworks through a copy"
    t_md, j_md = interop.to_torch(md, tdev), interop.to_jax(md, j_idx.devices().pop())

    ref_topk, _ = interop.reference_index_topk(ispec, index_query, np.asarray(j_idx), md)
    t_topk = torch_sparse.index_topk(ispec, interop.to_torch(index_query, tdev), t_idx, t_md)
    j_topk = jax_sparse.index_topk(ispec, interop.to_jax(index_query, j_idx.devices().pop()),
                                   j_idx, j_md, implementation=jax_indexer)
    np.testing.assert_array_equal(t_topk.cpu().numpy(), ref_topk, err_msg=f"torch topk, {label}")
    np.testing.assert_array_equal(np.asarray(j_topk), ref_topk, err_msg=f"jax topk, {label}")

    # Each attention reads the other framework's selection through the bridges.
    t_out = torch.full((n, heads, 128), float("nan"), dtype=torch.bfloat16, device=tdev)
    torch_sparse.sparse_attention(spec, interop.to_torch(query, tdev), t_kv,
                                  interop.to_torch(j_topk), t_md, t_out)
    j_out = jax_sparse.sparse_attention(spec, interop.to_jax(query, j_idx.devices().pop()),
                                        j_kv, interop.to_jax(t_topk), j_md)
    ref = interop.reference_attention(spec, query, np.asarray(j_kv), ref_topk, md)
    rows = md.num_actual_tokens
    t_out = t_out.float().cpu().numpy().astype(np.float64)[:rows]
    j_out = np.asarray(j_out).astype(np.float64)[:rows]
    errors = {"torch": relative_error(t_out, ref[:rows]),
              "jax": relative_error(j_out, ref[:rows]),
              "torch vs jax": relative_error(t_out, j_out)}
    assert max(errors.values()) < TOL and np.isfinite(t_out).all(), f"{label}: {errors}"


@pytest.mark.parametrize("writer, index_cache_dtype, jax_indexer", [
    ("torch", "auto", "pallas"), ("jax", "fp8_e4m3", "pallas"), ("torch", "auto", "xla")])
def test_indexer_then_attention_on_shared_caches(rng, writer, index_cache_dtype, jax_indexer):
    """Two decodes and a prefill crossing a block boundary; GQA 4, top-4."""
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=4)         # head 128, block 128
    ispec = IndexerSpec(2, topk_blocks=4, index_cache_dtype=index_cache_dtype)
    _layer_parity(rng, spec, ispec, [1, 1, 5], [700, 129, 260], writer, jax_indexer, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, writer", [((64, 4), "torch"), ((16, 1), "jax")])
def test_gpu_m3_layer_on_shared_caches(rng, heads, writer):
    """M3's shapes on the GPU (TP 1 and TP 4): decodes at up to 32k tokens beside a prefill."""
    spec = interop.SparseAttentionSpec(*heads, topk_blocks=16)
    ispec = IndexerSpec(heads[1])
    _layer_parity(rng, spec, ispec, [1, 1, 1, 300], [32768, 4000, 129, 2000], writer, "pallas",
                  "cuda")
