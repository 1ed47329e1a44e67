"""Caches past the 32-bit marks (GPU only, marker `large`): 2^31 bytes, 2^31 elements, 2^32 bytes.

A kernel that computes a cache offset in 32 bits reads before the cache once a selected page
lies past a mark: an illegal address, or garbage that looks like a result. Each case fills a
cache of a few GB with random values on the device, owned by PyTorch or by JAX and crossed to
the other framework without a copy, builds a batch whose selected pages sit on both sides of
every mark inside the cache and at its very end, and checks every path of both front ends
against a float32 reference computed on the device by gathering only the selected pages (the
float64 reference would need the whole cache in host memory). write_kv is checked at slots on
the same pages.

    python -m pytest -q -m large tests/test_parity_large_cache.py       # about 2 min on an H100
    bash tests/sanitize_large_cache.sh      # the PyTorch half under compute-sanitizer (about 30 s)
"""
import inspect

import numpy as np
import pytest

import interop
from interop.testing import make_topk, relative_error

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import jax_sparse  # noqa: E402
import torch_sparse  # noqa: E402
from torch_sparse.eager import sparse_attention_eager  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.large,
              pytest.mark.skipif(not torch.cuda.is_available()
                                 or jax.default_backend() != "gpu",
                                 reason="needs PyTorch and JAX on a CUDA GPU")]

TOL = 1e-2
HEADS = (64, 4)                       # MiniMax-M3: a page is 2 * 128 * 4 * 128 = 2^17 elements
PAGE_ELEMENTS = 2 * 128 * HEADS[1] * 128
MARKS = (2**31, 2**32)                # in bytes and in elements
# (cache dtype, pages, layout, owner): sizes under, between and past the marks.
CASES = [
    ("fp8_e4m3", 2**14 - 1, "NHD", "torch"),   # 2^31 - 2^17 bytes: the last size 32 bits reach
    ("fp8_e4m3", 24576, "NHD", "torch"),       # 3.2e9 bytes: past 2^31, under 2^32
    ("fp8_e4m3", 24576, "NHD", "jax"),
    ("fp8_e4m3", 24576, "HND", "jax"),
    ("fp8_e5m2", 24576, "HND", "torch"),
    ("fp8_e4m3", 34000, "NHD", "torch"),       # 4.5e9 bytes: past 2^32
    ("fp8_e4m3", 34000, "HND", "jax"),
    ("bfloat16", 16400, "NHD", "jax"),         # 2.15e9 elements, 4.3e9 bytes
    ("bfloat16", 16400, "HND", "torch"),
]
# Decodes of 4096 tokens, then prefills (query, context) whose tiles straddle requests.
DECODES = 8
PREFILLS = [(96, 1000), (64, 0), (40, 300)]


def _mark_pages(num_pages: int, itemsize: int) -> list[int]:
    """Pages on both sides of each mark (in bytes and in elements) inside the cache, and the
    last two pages."""
    pages = {num_pages - 1, num_pages - 2}
    for mark in MARKS:
        for elements in {mark, mark // itemsize}:
            first = -(-elements // PAGE_ELEMENTS)
            pages |= {p for p in (first - 1, first) if 0 <= p < num_pages}
    return sorted(pages)


def _batch(num_pages: int, itemsize: int, rng):
    """Metadata (NumPy) whose own blocks (always selected) are the mark pages, the other
    blocks random pages anywhere in the cache, and the top-k selection."""
    query_lens = [1] * DECODES + [q for q, _ in PREFILLS]
    seq_lens = [4096] * DECODES + [q + c for q, c in PREFILLS]
    needed = [-(-s // 128) for s in seq_lens]
    special = _mark_pages(num_pages, itemsize)
    others = rng.choice(np.setdiff1d(np.arange(num_pages), special), sum(needed),
                        replace=False)
    table = np.full((len(seq_lens), max(needed) + 1), -1, np.int32)
    start = 0
    for r, n in enumerate(needed):
        table[r, :n] = others[start:start + n]
        start += n
    # Every decode's own block and every prefill's blocks land on mark pages.
    for r in range(DECODES):
        table[r, needed[r] - 1] = special[r % len(special)]
    for i, r in enumerate(range(DECODES, len(seq_lens))):
        for b in range(needed[r]):
            table[r, b] = special[(i + b) % len(special)]
    md = interop.build_metadata(query_lens, seq_lens, table, num_blocks=num_pages)
    topk = make_topk(md, HEADS[1], 16, rng, future_fraction=0.2)
    return md, topk, special


def _fill_torch(view):
    """Random normal values in the cache, generated on the device in chunks."""
    flat = torch.as_strided(view, (view.numel(),), (1,))
    for start in range(0, flat.numel(), 1 << 28):
        chunk = flat[start:start + (1 << 28)]
        chunk.copy_(torch.randn(chunk.numel(), device=view.device))


def _cache(spec, num_pages, owner, query_dtype):
    """(torch logical view, jax physical array) over one buffer, allocated by `owner`."""
    if owner == "torch":
        view = interop.allocate_torch_kv_cache(spec, num_pages, query_dtype, device="cuda")
        _fill_torch(view)
        torch.cuda.synchronize()
        return view, interop.kv_cache_to_jax(view, spec)
    storage = spec.cache_storage_dtype(query_dtype)
    shape = spec.physical_kv_cache_shape(num_pages)
    fill = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32).astype(storage))
    array = fill(jax.random.key(0))
    array.block_until_ready()
    return interop.kv_cache_to_torch(array, spec), array


def _algorithms(fn):
    params = inspect.signature(fn).parameters
    return interop.PREFILL_ALGORITHMS if "prefill_algorithm" in params else (None,)


@pytest.mark.parametrize("cache, num_pages, layout, owner", CASES,
                         ids=[f"{c}-{n}pages-{l}-{o}" for c, n, l, o in CASES])
def test_large_cache(cache, num_pages, layout, owner):
    rng = np.random.default_rng(num_pages + len(layout) + len(owner))
    spec = interop.SparseAttentionSpec(*HEADS, topk_blocks=16, kv_cache_dtype=cache,
                                       kv_cache_layout=layout)
    fp8 = cache.startswith("fp8")
    view, array = _cache(spec, num_pages, owner, "bfloat16")
    itemsize = view.element_size()
    assert view.numel() * itemsize > 2**31 - 2**18, "the case is smaller than meant"
    md, topk, special = _batch(num_pages, itemsize, rng)
    tmd = interop.to_torch(md, "cuda")
    jmd = interop.to_jax(md)
    n = md.num_tokens
    query = torch.randn((n, HEADS[0], 128), device="cuda").to(torch.bfloat16)
    topk_t = torch.as_tensor(topk, device="cuda")
    slots = (HEADS[1], num_pages * 128)
    k_scale = v_scale = None
    if fp8:
        k_scale = torch.rand(slots, device="cuda") + 0.5
        v_scale = torch.rand(slots, device="cuda") + 0.5

    ref = torch.empty((n, HEADS[0], 128), dtype=torch.float32, device="cuda")
    sparse_attention_eager(query, view, topk_t, tmd.block_table, tmd.token_to_req,
                           tmd.token_positions, ref, spec.scale, k_scale, v_scale)
    ref = ref.cpu().numpy()
    assert np.abs(ref).sum() > 0
    label = f"{cache} {num_pages} pages {layout} owned by {owner}"

    for algorithm in _algorithms(torch_sparse.sparse_attention):
        kw = {} if algorithm is None else {"prefill_algorithm": algorithm}
        out = torch.full_like(query, float("nan"))
        torch_sparse.sparse_attention(spec, query, view, topk_t, tmd, out, k_scale=k_scale,
                                      v_scale=v_scale, **kw)
        torch.cuda.synchronize()
        err = relative_error(out.float().cpu().numpy(), ref)
        assert err < TOL, f"torch {algorithm} {label}: relative error {err:.3g}"

    jq = interop.to_jax(query)
    jtopk = jnp.asarray(topk)
    jks, jvs = (None, None) if not fp8 else (interop.to_jax(k_scale), interop.to_jax(v_scale))
    runs = [("pallas", a) for a in _algorithms(jax_sparse.sparse_attention)] + [("xla", None)]
    for impl, algorithm in runs:
        kw = {} if algorithm is None else {"prefill_algorithm": algorithm}
        out = jax_sparse.sparse_attention(spec, jq, array, jtopk, jmd, k_scale=jks,
                                          v_scale=jvs, implementation=impl, **kw)
        err = relative_error(np.asarray(out.astype(jnp.float32)), ref)
        assert err < TOL, f"jax {impl} {algorithm} {label}: relative error {err:.3g}"

    # write_kv at slots on the mark pages, by each framework, read back through PyTorch.
    slots = torch.tensor([p * 128 + o for p in special for o in (0, 77, 127)], device="cuda")
    dtype = view.dtype
    def torch_write(key, value):
        torch_sparse.write_kv(view, key, value, slots, spec, k_scale, v_scale)
        return view

    _check_write(torch_write, spec, slots, k_scale, v_scale, dtype, f"torch write_kv {label}")
    # JAX updates a donated cache in place, which it refuses while a PyTorch view of a buffer
    # it owns is alive: drop every view first. (A buffer PyTorch owns is copied instead.)
    del torch_write, view, out
    scales = [None if s is None else interop.to_jax(s) for s in (k_scale, v_scale)]

    def jax_write(key, value):
        new = jax_sparse.write_kv(array, interop.to_jax(key), interop.to_jax(value),
                                  interop.to_jax(slots), spec, *scales)
        return interop.kv_cache_to_torch(new, spec)

    _check_write(jax_write, spec, slots, k_scale, v_scale, dtype, f"jax write_kv {label}")


def _check_write(write, spec, slots, k_scale, v_scale, dtype, label):
    """write(key, value) -> the logical view after the write; checks the stored values."""
    key = torch.randn((slots.numel(), spec.num_kv_heads, 128), device="cuda").to(torch.bfloat16)
    value = torch.randn_like(key)
    view = write(key, value)
    torch.cuda.synchronize()
    for kv, new, scale in ((0, key, k_scale), (1, value, v_scale)):
        stored = view[slots // 128, kv, slots % 128].float()
        assert torch.equal(stored, _quantized(new, scale, slots, dtype)), f"{label} {'KV'[kv]}"


def _quantized(new, scale, slots, dtype):
    """What a write of `new` [T, kv_heads, D] at `slots` stores, read back as float32."""
    new = new.float()
    if scale is not None:
        new = new / scale[:, slots].T[..., None]
    return new.to(dtype).float()
