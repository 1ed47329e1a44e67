"""DLPack bridges on whatever device is present (CPU in CI; the gpu group on CUDA): zero-copy
shown by equal buffer addresses, layout-aware cache views, metadata flavours, clear errors."""
import numpy as np
import pytest

import interop
from interop.testing import NUMPY_DTYPES, matching_query_dtype, random_problem

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

CACHE_DTYPES = ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"]


def _device(kind):
    if kind == "gpu":
        return torch.device("cuda"), jax.devices("gpu")[0]
    return torch.device("cpu"), jax.devices("cpu")[0]


def _spec(layout, dtype):
    name = {"bfloat16": "bfloat16", "float16": "float16", "float8_e4m3fn": "fp8_e4m3",
            "float8_e5m2": "fp8_e5m2"}[dtype]
    return interop.SparseAttentionSpec(8, 2, kv_cache_dtype=name, kv_cache_layout=layout)


def _check_cache_round_trip(kind, layout, dtype):
    tdev, _ = _device(kind)
    spec = _spec(layout, dtype)
    view = interop.allocate_torch_kv_cache(spec, 3, matching_query_dtype(dtype), device=tdev)
    assert tuple(view.shape) == spec.kv_cache_shape(3)
    view.copy_(torch.randn(view.shape, device=tdev).to(view.dtype))
    # torch -> jax: the physical array over the same buffer.
    arr = interop.kv_cache_to_jax(view, spec)
    assert arr.shape == spec.physical_kv_cache_shape(3) and arr.dtype.name == dtype
    assert arr.unsafe_buffer_pointer() == view.data_ptr(), (kind, layout, dtype)
    np.testing.assert_array_equal(
        np.asarray(arr).astype(np.float32),
        view.permute(*spec.kv_cache_stride_order()).float().cpu().numpy())
    # A write through PyTorch after the hand-over is seen by the JAX array (one buffer).
    view[1, 0, 5, 1].fill_(3.0)
    interop.wait_for_writes(view)
    assert float(np.asarray(arr[1, 0, 5, 1, 0] if layout == "NHD" else arr[1, 0, 1, 5, 0]).astype(np.float32)) == 3.0
    assert float(interop.kv_cache_to_torch(arr, spec)[1, 0, 5, 1, 0].float()) == 3.0
    # jax -> torch: the logical view over JAX's buffer. (Computed on the device: np.asarray
    # above cached a host copy of `arr` taken before the write, which a GPU array keeps.)
    owned = jnp.array(arr, copy=True)
    back = interop.kv_cache_to_torch(owned, spec)
    assert back.data_ptr() == owned.unsafe_buffer_pointer(), (kind, layout, dtype)
    assert tuple(back.shape) == spec.kv_cache_shape(3)
    torch.testing.assert_close(back.float(), view.float(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_cache_zero_copy_cpu(layout, dtype):
    _check_cache_round_trip("cpu", layout, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_cache_zero_copy_gpu(layout, dtype):
    _check_cache_round_trip("gpu", layout, dtype)


@pytest.mark.parametrize("dtype", CACHE_DTYPES + ["float32", "int32"])
def test_numpy_to_torch_and_jax(dtype):
    x = np.arange(24).reshape(2, 3, 4).astype(NUMPY_DTYPES.get(dtype, dtype))
    t = interop.to_torch(x)
    assert str(t.dtype) == f"torch.{dtype}"
    np.testing.assert_array_equal(t.float().numpy(), x.astype(np.float32))
    j = interop.to_jax(x)
    assert j.dtype == x.dtype
    assert interop.to_torch(j).data_ptr() == j.unsafe_buffer_pointer()


def test_metadata_flavours(rng):
    spec = interop.SparseAttentionSpec(8, 2, topk_blocks=3)
    md = random_problem(spec, [1, 1, 6], [300, 9, 140], rng, num_tokens=10, max_blocks=4).metadata
    tmd = interop.to_torch(md)
    assert isinstance(tmd.slot_mapping, torch.Tensor) and tmd.slot_mapping.dtype == torch.int64
    assert tmd.num_decodes == 2 and isinstance(tmd.num_decodes, int)
    assert tmd.prefill.cu_seqlens_q.tolist() == [0, 6]
    jmd = interop.to_jax(md)
    leaves, tree = jax.tree_util.tree_flatten(jmd)
    assert all(isinstance(x, jax.Array) for x in leaves)
    np.testing.assert_array_equal(jmd.token_positions, md.token_positions)
    assert int(jmd.num_prefill_tokens) == 6 and jmd.decode.seq_lens.tolist() == [300, 9]
    # Under jit the counts are traced: a different batch of the same sizes reuses the trace.
    traces = []

    @jax.jit
    def f(m):
        traces.append(1)
        return m.token_positions.sum() + m.num_decodes
    md2 = random_problem(spec, [1, 4, 3], [5, 9, 140], rng, num_tokens=10, max_blocks=4).metadata
    assert int(f(jmd)) == md.token_positions.sum() + 2
    assert int(f(interop.to_jax(md2))) == md2.token_positions.sum() + 1
    assert len(traces) == 1
    back = interop.to_torch(jmd)
    assert back.num_decodes == 2 and back.token_to_req.tolist() == md.token_to_req.tolist()


def test_bridge_errors():
    spec = interop.SparseAttentionSpec(8, 2, kv_cache_layout="HND")
    nhd_storage = torch.zeros(spec.kv_cache_shape(2), dtype=torch.bfloat16)  # NHD memory
    with pytest.raises(ValueError, match="not the HND layout"):
        interop.kv_cache_to_jax(nhd_storage, spec)
    copied = interop.kv_cache_to_jax(nhd_storage, spec, copy=True)
    assert copied.shape == spec.physical_kv_cache_shape(2)
    with pytest.raises(ValueError, match="non-contiguous"):
        interop.to_jax(torch.zeros(4, 6)[:, ::2])
    assert interop.to_jax(torch.zeros(4, 6)[:, ::2], copy=True).shape == (4, 3)
    with pytest.raises(ValueError, match="kv_cache shape"):
        interop.kv_cache_to_jax(torch.zeros(2, 2, 128, 3, 128), spec)
    with pytest.raises(ValueError, match="kv_cache shape"):
        interop.kv_cache_to_torch(jnp.zeros((2, 2, 128, 2, 128)), spec)
    with pytest.raises(TypeError, match="logical view"):
        interop.kv_cache_to_torch(nhd_storage, spec)
    with pytest.raises(TypeError, match="to_torch takes"):
        interop.to_torch([1, 2, 3])
    with pytest.raises(TypeError, match="wait_for_writes takes"):
        interop.wait_for_writes(np.zeros(3))
    with pytest.raises(TypeError, match="to_jax takes"):
        interop.to_jax("cache")
    # A dtype DLPack cannot carry: complex32 has no JAX counterpart.
    with pytest.raises(TypeError, match="cannot share"):
        interop.to_jax(torch.zeros(4, dtype=torch.complex32))
    x = torch.arange(6.0)
    assert interop.to_torch(x) is x and interop.to_torch(x, copy=True).data_ptr() != x.data_ptr()
