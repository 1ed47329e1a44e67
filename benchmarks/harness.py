"""What the benchmark scripts share: the environment, the cases, the timers and the peer.

Import it before any kernel module. On import it sets the environment and puts the checkout
(and the peer's `.peer/`, from ../shared/tools/peer-setup.sh, when present) on the import path,
so the scripts run without installing. A CPU run (`--smoke`, or `--rows smoke`, on the command
line) gets the Triton interpreter and JAX on CPU; JAX never preallocates GPU memory.

- `Case`: one batch on the device, shared by every path (the JAX side views the same cache).
  `torch_attention`, `torch_seed_decode` and `jax_attention` are the only places the benchmarks
  call the front ends, so an API change touches this file alone.
- Timers, medians in ms. Cold L2 (the figure a model sees: every other layer runs between two
  calls of one layer): `torch_cold_ms` (eager, CUDA events), `graph_cold_ms` (CUDA-graph
  replay), both `triton.testing.do_bench`, which zeroes 256 MB before every call;
  `jax_cold_ms` (the same flush, then host time to `block_until_ready`). Warm L2 (back to back,
  label them so): `graph_warm_ms`, `jax_call_ms`, `jax_steady_ms`. On a CPU run every timer
  times one call on the host: it tests the code path and measures nothing.
- The peer: vLLM's pure-Triton MiniMax-M3 kernels (`vllm.models.minimax_m3.common.ops.
  sparse_attn`), fed its packed cache and valid-first selection rows built outside the timed
  region (`peer_inputs`).
"""
import os
import sys


def _cpu_run(argv) -> bool:
    if "--smoke" in argv or "--rows=smoke" in argv:
        return True
    return any(a == "--rows" and b == "smoke" for a, b in zip(argv, argv[1:]))


SMOKE = _cpu_run(sys.argv)
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(ROOT, ".peer")):
    sys.path.append(os.path.join(ROOT, ".peer"))

import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402
from interop.testing import make_topk, random_block_table, relative_error  # noqa: E402

BS = 128  # block size == page size
DEVICE = "cpu" if SMOKE else "cuda"


# --- the front ends (their only call sites in the benchmarks) -----------------------------------

def torch_attention(spec, q, cache, topk, md, out, *, prefill_algorithm=None, **kw):
    """`torch_sparse.sparse_attention`; None keywords are left out (the front end's default)."""
    import torch_sparse
    kw = {k: v for k, v in dict(kw, prefill_algorithm=prefill_algorithm).items() if v is not None}
    return torch_sparse.sparse_attention(spec, q, cache, topk, md, out, **kw)


def torch_seed_decode(spec, q, cache, topk, block_table, seq_lens, out, query_len, **kw):
    """The seed's decode call, `torch_sparse.minimax_m3_sparse_attn_decode`."""
    import torch_sparse
    return torch_sparse.minimax_m3_sparse_attn_decode(q, cache, topk, block_table, seq_lens,
                                                      spec.num_kv_heads, spec.scale, out,
                                                      query_len, **kw)


def jax_attention(spec, **kw):
    """`jax_sparse.sparse_attention` with spec and keywords bound: op(q, cache, topk, md).
    None keywords are left out (the platform's default implementation, "auto", the knobs')."""
    import jax_sparse
    kw = {k: v for k, v in kw.items() if v is not None}
    return functools.partial(jax_sparse.sparse_attention, spec, **kw)


def mosaic_note():
    """None where jax_sparse's Mosaic GPU kernels can run here, else why not."""
    from jax_sparse.mosaic import mosaic_unavailable_reason
    return mosaic_unavailable_reason()


class Case:
    """One batch on the device, every path reading the same data.

    query_lens / seq_lens: per request (decode requests first, `decode_query_len` tokens each;
    a value above every query length makes every request a prefill). rho: the selection's
    keep-probability (`interop.testing.make_topk`; None: uniform random). scales: (k_scale,
    v_scale) floats for an FP8 cache, or None. topk: None, or the selection of an earlier case
    of the same batch shape (`topk_np`), reused as it is (rho is then ignored). Bytes and
    FLOPs are counted from the actual selection: `kv_bytes` the K/V bytes of the valid
    selected blocks (decode's traffic), `flops` 4 * head_size * the keys each (token, query
    head) attends (useful FLOPs).
    """

    def __init__(self, spec, query_lens, seq_lens, rng, decode_query_len=1, *, rho=None,
                 scales=None, topk=None, device=DEVICE):
        import jax
        table, num_blocks = random_block_table(seq_lens, rng, block_size=BS, spare_blocks=1)
        md = interop.build_metadata(query_lens, seq_lens, table,
                                    decode_query_len=decode_query_len, num_blocks=num_blocks)
        self.spec, self.md = spec, md
        if topk is None:
            topk = make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng, rho=rho)
        self.topk_np = topk
        dev = torch.device(device)
        self.cache = interop.allocate_torch_kv_cache(spec, num_blocks, "bfloat16", device=dev)
        phys = self.cache.permute(*spec.kv_cache_stride_order())
        phys.copy_(torch.randn(phys.shape, device=dev, dtype=torch.bfloat16).to(phys.dtype))
        self.q = torch.randn(md.num_tokens, spec.num_heads, spec.head_size, device=dev,
                             dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.topk = torch.from_numpy(topk).to(dev)
        self.t_md = interop.to_torch(md, dev)
        self.j_cache = interop.kv_cache_to_jax(self.cache, spec)
        self.j_q = interop.to_jax(self.q)
        self.j_topk = interop.to_jax(self.topk)
        self.j_md = interop.to_jax(md, jax.devices("gpu" if dev.type == "cuda" else "cpu")[0])
        self.k_scale = self.v_scale = self.j_k_scale = self.j_v_scale = None
        if scales is not None:
            self.k_scale, self.v_scale = (torch.tensor(s, dtype=torch.float32, device=dev)
                                          for s in scales)
            self.j_k_scale, self.j_v_scale = map(interop.to_jax, (self.k_scale, self.v_scale))
        valid = interop.metadata.valid_topk_mask(topk, md.token_positions, BS)
        self.rows_blocks = int(valid.sum())  # selected (token, KV head, block) triples
        keys = np.clip(md.token_positions[None, :, None] - topk * BS + 1, 0, BS) * valid
        self.keys_attended = int(keys.sum()) * spec.num_queries_per_kv  # over query heads
        self.kv_bytes = self.rows_blocks * BS * spec.head_size * 2 * self.cache.element_size()
        self.flops = 4 * spec.head_size * self.keys_attended

    def torch_fn(self, prefill_algorithm=None):
        """The public PyTorch call on this case, writing and returning `self.out`."""
        args = (self.spec, self.q, self.cache, self.topk, self.t_md, self.out)
        kw = dict(prefill_algorithm=prefill_algorithm, k_scale=self.k_scale, v_scale=self.v_scale)
        return lambda: torch_attention(*args, **kw)

    def jax_op(self, **kw):
        """The public JAX call (jitted inside) with this case's scales and `kw` bound:
        op(q, cache, topk, md), to call inside a jitted function."""
        return jax_attention(self.spec, k_scale=self.j_k_scale, v_scale=self.j_v_scale, **kw)

    def jax_fn(self, **kw):
        """The public JAX call on this case: fn() returns the output."""
        op, args = self.jax_op(**kw), (self.j_q, self.j_cache, self.j_topk, self.j_md)
        return lambda: op(*args)

    def seed_decode_fn(self, query_len, out):
        """The seed's decode call on this (all-decode) case, writing `out`."""
        dec = self.md.decode
        table, seq = (torch.as_tensor(x, dtype=torch.int32, device=self.q.device)
                      for x in (dec.block_table, dec.seq_lens))
        args = (self.spec, self.q, self.cache, self.topk, table, seq, out, query_len)
        kw = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        return lambda: torch_seed_decode(*args, **kw)

    def sample_idx(self, samples):
        """Up to `samples` token indices spread over the batch, first and last included."""
        n = self.md.num_tokens
        return np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(np.int64))

    def reference(self, idx):
        """float64 [len(idx), num_heads, head_size]: interop.reference_attention on rows idx."""
        md = self.md
        rows = types.SimpleNamespace(token_positions=md.token_positions[idx],
                                     token_to_req=md.token_to_req[idx],
                                     block_table=md.block_table)
        scales = [None if s is None else float(s) for s in (self.k_scale, self.v_scale)]
        q = self.q[torch.from_numpy(idx).to(self.q.device)]
        return interop.reference_attention(self.spec, q, self.cache, self.topk_np[:, idx], rows,
                                           *scales)

    def check(self, samples=256):
        """Relative difference of the two front ends on sampled tokens (guards the timings)."""
        idx = self.sample_idx(samples)
        return relative_error(sample(self.jax_fn()(), idx), sample(self.torch_fn()(), idx))


def sample(out, idx):
    """Rows idx of an output (either framework) as float32 NumPy."""
    if isinstance(out, torch.Tensor):
        return out[torch.from_numpy(idx).to(out.device)].float().cpu().numpy()
    return np.asarray(out[idx]).astype(np.float32)


# --- timers --------------------------------------------------------------------------------------

def _host_once_on_cpu(timer):
    """On a CPU run (no CUDA events, graphs or L2 to flush) time one call on the host."""
    @functools.wraps(timer)
    def timed(fn, *args, **kw):
        if not SMOKE:
            return timer(fn, *args, **kw)
        t0 = time.perf_counter()
        out = fn()
        getattr(out, "block_until_ready", lambda: None)()
        return (time.perf_counter() - t0) * 1e3
    return timed


@_host_once_on_cpu
def torch_cold_ms(fn, rep_ms=100):
    """Median CUDA-event time of fn(); do_bench zeroes 256 MB before each call (cold L2)."""
    import triton
    return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")


@_host_once_on_cpu
def graph_cold_ms(fn, rep_ms=100):
    """Median time of one CUDA-graph replay of fn(), L2 flushed before each (do_bench)."""
    import triton
    return triton.testing.do_bench(capture_graph(fn).replay, rep=rep_ms, return_mode="median")


@_host_once_on_cpu
def graph_warm_ms(fn):
    """Median CUDA-graph replay of fn(), replays back to back (warm L2: a small working set
    stays in the 50 MB L2, reading up to about 40% better than a model sees)."""
    import triton
    return triton.testing.do_bench_cudagraph(fn, return_mode="median")


@_host_once_on_cpu
def jax_call_ms(fn, iters=50, warmup=5):
    """Median host time of one jitted call to `block_until_ready` (warm L2; host dispatch
    included)."""
    for _ in range(warmup):
        fn().block_until_ready()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().block_until_ready()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


@_host_once_on_cpu
def jax_steady_ms(fn, n=50):
    """Steady-state time per call: n jitted calls queued back to back, one wait at the end
    (the host's dispatch overlaps the GPU work, as in a serving loop; warm L2)."""
    fn().block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    out.block_until_ready()
    return (time.perf_counter() - t0) * 1e3 / n


_L2_FLUSH = []


@_host_once_on_cpu
def jax_cold_ms(fn, rep_ms=300, min_iters=5, max_iters=50):
    """Median host time of one jitted call to `block_until_ready`, after zeroing 256 MB on the
    device (cold L2, as do_bench does); includes JAX's host dispatch (tens of us)."""
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(1 << 28, dtype=torch.int8, device="cuda"))
    fn().block_until_ready()
    ts, end = [], time.perf_counter() + rep_ms * 1e-3
    while len(ts) < min_iters or (len(ts) < max_iters and time.perf_counter() < end):
        _L2_FLUSH[0].zero_()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().block_until_ready()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def capture_graph(fn, warmups: int = 3):
    """A CUDA graph of fn(), captured after `warmups` calls (compiles) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def ceilings():
    """The device's copy bandwidth (bytes read + written) and bf16 matmul rate, this run."""
    import triton
    a = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    copy_tbs = 2 * a.numel() * 2 / (t * 1e-3) / 1e12
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: x @ y, return_mode="median")
    return {"copy_tbs": copy_tbs, "matmul_bf16_tflops": 2 * m ** 3 / (t * 1e-3) / 1e12}


# --- the peer: vLLM's Triton kernels -------------------------------------------------------------

def peer_module():
    try:
        from vllm.models.minimax_m3.common.ops import sparse_attn
    except ImportError:
        return None
    return sparse_attn


def vllm_version():
    """vllm's version; the peer's module alone (.peer, no version) is named as such."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", "peer kernels only (.peer)")


def _int32(x, device):
    return torch.as_tensor(np.asarray(x), dtype=torch.int32, device=device)


def peer_inputs(case):
    """(packed cache, valid-first top-k, None): the case's data as the peer reads it, built
    outside any timed region; (None, None, note) where the peer cannot run on it.

    The packed cache is (num_blocks, num_kv_heads, block_size, 2 * head_size), K then V; rows
    are reordered valid-first because the peer walks only the first min(topk, visible
    blocks) entries of a row (a row with fewer valid entries would make it read sentinels).
    """
    if peer_module() is None:
        return None, None, "peer not importable (../shared/tools/peer-setup.sh; .peer)"
    cache, n = case.cache, case.md.num_tokens
    pos = case.t_md.token_positions[:n].long()
    topk = case.topk[:, :n].long()
    valid = (topk >= 0) & (topk <= (pos // BS)[None, :, None])
    walked = torch.clamp(pos // BS + 1, max=topk.shape[-1])
    if not torch.equal(valid.sum(-1), walked.expand_as(valid[..., 0])):
        return None, None, "rows with fewer valid entries than visible blocks"
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    p_topk = topk.gather(-1, order).to(torch.int32).contiguous()
    nb, _, bs, kvh, d = cache.shape
    packed = torch.empty((nb, kvh, bs, 2 * d), dtype=cache.dtype, device=cache.device)
    raw = (lambda x: x.view(torch.uint8)) if cache.element_size() == 1 else (lambda x: x)
    for i in (0, 1):  # K, V; FP8 copied as bytes
        raw(packed)[..., i * d:(i + 1) * d].copy_(raw(cache[:, i].transpose(1, 2)))
    return packed, p_topk, None


def peer_prefill_fn(case):
    """(call, note): the peer's prefill call on this case (call() returns its own output
    buffer), or (None, why not)."""
    packed, p_topk, note = peer_inputs(case)
    if note:
        return None, note
    peer, spec, pf, dev = peer_module(), case.spec, case.md.prefill, case.cache.device
    cu, seq, prefix, table = (_int32(x, dev) for x in (pf.cu_seqlens_q, pf.seq_lens,
                                                       pf.context_lens, pf.block_table))
    max_q = int(pf.max_query_len)
    q, ks, vs = case.q, case.k_scale, case.v_scale
    if SMOKE:  # the Triton interpreter misreads the peer's bf16 reshapes; float16 holds the data
        q = q.half()
        packed = packed.half() if packed.dtype == torch.bfloat16 else packed
    out = torch.full_like(q, float("nan"))

    def call():
        peer.minimax_m3_sparse_attn(q, packed, p_topk, table, cu, seq, prefix, max_q,
                                    spec.num_kv_heads, spec.scale, out, k_scale=ks, v_scale=vs)
        return out
    return call, None


def peer_decode_fn(case, query_len):
    """(call, note): the peer's decode call on this (all-decode) case, or (None, why not)."""
    if SMOKE:
        return None, "the peer's decode kernel does not run under the Triton interpreter"
    packed, p_topk, note = peer_inputs(case)
    if note:
        return None, note
    spec, dec, dev = case.spec, case.md.decode, case.cache.device
    table, seq = _int32(dec.block_table, dev), _int32(dec.seq_lens, dev)
    out = torch.full_like(case.q, float("nan"))

    def call():
        peer_module().minimax_m3_sparse_attn_decode(case.q, packed, p_topk, table, seq,
                                                    spec.num_kv_heads, spec.scale, out,
                                                    query_len)
        return out
    return call, None
