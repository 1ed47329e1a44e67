"""Benchmark both paths against the measured ceilings and the peer (vLLM's Triton kernels).

    python benchmarks/bench.py --out bench_out              # decode + prefill (long: split it)
    python benchmarks/bench.py --quick --out bench_out      # a few rows
    python benchmarks/bench.py --only prefill --heads 64/4 --caches auto --out bench_out/p1
    python benchmarks/bench.py --smoke --out /tmp/smoke     # tiny prefill rows on CPU, interpreters
    python benchmarks/bench.py --merge bench_out/p1 bench_out/p2 --out bench_out   # one table

Decode: one query token (or 2, speculative) per request, every request at 32k tokens; bytes =
the K/V bytes of the selected blocks each (token, KV head) row reads. Medians of CUDA-event
timings (`triton.testing.do_bench`) for PyTorch, eager and as CUDA-graph replay (back to back:
warm L2); `block_until_ready` timings of one jitted call for JAX, and its steady state (calls
queued back to back). Beside them (issue 11), cold L2: CUDA-graph replay of the seed's decode
call and of the peer's (`do_bench` on `graph.replay`, L2 flushed before each replay), their
ratio, and the peer's difference from ours on sampled tokens.

Prefill (issue 10): one request of 16k or 64k tokens (no cached context), or 4 requests x 2048
new tokens after 8192 cached; random (rho None) or correlated (rho 0.87) selections; for each,
PyTorch and JAX with every `prefill_algorithm` and the peer's prefill kernel (bf16 and FP8
caches; the peer gets its packed cache and valid-first rows, converted outside the timed
region). Useful FLOPs = 4 * head_size * sum over (token, query head) of the keys it attends
(validity and causality counted from the actual selection). L2 is cold for every timed call:
`do_bench` (PyTorch, peer) zeroes 256 MB before each call; JAX calls are host-timed around
`block_until_ready` after the same flush (host dispatch included: tens of us). Every path's
output is checked on sampled rows against the per-token PyTorch kernel and the float64
reference (outputs poisoned with NaN first: an unwritten row shows as inf).

Writes `bench.json` (every figure and the device), `bench_partial.json` (rewritten after every
figure, so a run cut short keeps what it measured), `bench.md` and `decode_bandwidth.png`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import types

from harness import SMOKE, capture_graph  # first: sets the environment before any kernel import

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import interop  # noqa: E402
from interop.testing import (make_topk, mean_tile_union, random_block_table,  # noqa: E402
                             relative_error)

BS = 128


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def ceilings():
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    copy_tbs = 2 * a.numel() * 2 / (t * 1e-3) / 1e12
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: x @ y, return_mode="median")
    mm_tflops = 2 * m ** 3 / (t * 1e-3) / 1e12
    return {"copy_tbs": copy_tbs, "matmul_bf16_tflops": mm_tflops}


def jax_median_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn().block_until_ready()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().block_until_ready()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def jax_pipelined_ms(fn, n=50):
    """Steady-state time per call: n jitted calls queued back to back, one wait at the end
    (the host's per-call dispatch overlaps the GPU work, as in a serving loop)."""
    fn().block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    out.block_until_ready()
    return (time.perf_counter() - t0) * 1e3 / n


class Case:
    """One batch on the device, shared by every path (the JAX side views the same cache).

    rho: the selection's keep-probability (`interop.testing.make_topk`; None: random).
    scales: (k_scale, v_scale) floats for an FP8 cache (scalar scales), or None.
    device: "cuda", or "cpu" for --smoke (Triton interpreter, Pallas interpret mode).
    """

    def __init__(self, spec, query_lens, seq_lens, rng, decode_query_len=1, *, rho=None,
                 scales=None, device="cuda"):
        import jax
        table, num_blocks = random_block_table(seq_lens, rng, block_size=BS, spare_blocks=1)
        md = interop.build_metadata(query_lens, seq_lens, table,
                                    decode_query_len=decode_query_len, num_blocks=num_blocks)
        self.spec, self.md = spec, md
        topk = make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng, rho=rho)
        self.topk_np = topk
        dev = torch.device(device)
        self.cache = interop.allocate_torch_kv_cache(spec, num_blocks, "bfloat16", device=dev)
        phys = self.cache.permute(*spec.kv_cache_stride_order())
        phys.copy_(torch.randn(phys.shape, device=dev, dtype=torch.bfloat16).to(phys.dtype))
        n_tok = md.num_tokens
        self.q = torch.randn(n_tok, spec.num_heads, spec.head_size, device=dev,
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
        self.rows_blocks = int(valid.sum())  # selected (token, kv head, block) triples
        pos = md.token_positions[None, :, None]
        keys = np.clip(pos - topk * BS + 1, 0, BS) * valid
        self.keys_attended = int(keys.sum()) * spec.num_queries_per_kv  # over query heads
        self.kv_bytes = self.rows_blocks * BS * spec.head_size * 2 * self.cache.element_size()
        self.flops = 4 * spec.head_size * self.keys_attended

    def torch_fn(self, prefill_algorithm=None):
        """The public PyTorch call; prefill_algorithm None leaves the keyword out."""
        import torch_sparse
        spec, q, cache, topk, md, out = self.spec, self.q, self.cache, self.topk, self.t_md, self.out
        kw = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if prefill_algorithm is not None:
            kw["prefill_algorithm"] = prefill_algorithm
        return lambda: torch_sparse.sparse_attention(spec, q, cache, topk, md, out, **kw)

    def jax_fn(self, prefill_algorithm=None, implementation=None):
        """The public JAX call (jitted inside); prefill_algorithm / implementation None leave
        the keyword out (the platform default)."""
        import jax_sparse
        f = jax_sparse.sparse_attention
        spec, q, cache, topk, md = self.spec, self.j_q, self.j_cache, self.j_topk, self.j_md
        kw = dict(k_scale=self.j_k_scale, v_scale=self.j_v_scale)
        if prefill_algorithm is not None:
            kw["prefill_algorithm"] = prefill_algorithm
        if implementation is not None:
            kw["implementation"] = implementation
        return lambda: f(spec, q, cache, topk, md, **kw)

    def check(self, samples=256):
        """Relative difference of the two paths on sampled tokens (guards against timing garbage)."""
        self.torch_fn()()
        j_out = self.jax_fn()()
        idx = np.unique(np.linspace(0, self.q.shape[0] - 1, samples).astype(np.int64))
        j = np.asarray(j_out[idx]).astype(np.float32)
        t = self.out[torch.from_numpy(idx).cuda()].float().cpu().numpy()
        return float(np.linalg.norm(t - j) / max(np.linalg.norm(t), 1e-30))


# The peer's decode (vLLM 0.33's Triton MiniMax-M3 kernels, bf16 cache, L=1) as
# ../shared/PERF.md reports it on an H100 80GB; its prefill runs live in the prefill rows.
PEER_DECODE_US = {("64/4", 1): 56, ("64/4", 16): 56, ("64/4", 64): 112, ("64/4", 256): 394,
                  ("16/1", 64): 45, ("16/1", 256): 112}


def vllm_version():
    """vllm's version; the peer's module alone (.peer, no version) is named as such."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", "peer kernels only (.peer)")


# Prefill rows (issue 10). Shapes: name -> (query_lens, seq_lens); --smoke's are CPU-sized.
PREFILL_SHAPES = {"16k": ([16384], [16384]), "64k": ([65536], [65536]),
                  "4x2k+8k": ([2048] * 4, [10240] * 4)}
SMOKE_SHAPES = {"1x136": ([136], [136]), "2x24+136": ([24] * 2, [160] * 2)}
SELECTIONS = {"random": None, "rho0.87": 0.87}  # make_topk's rho
FP8_SCALES = (0.75, 1.25)  # scalar k_scale, v_scale of the FP8 rows
PREFILL_PATHS = tuple(f"{fw}:{alg}" for fw in ("torch", "jax")
                      for alg in ("token", "union", "k2q", "auto")) + ("mosaic", "peer")


def _accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def torch_cold_ms(fn, rep_ms):
    """Median CUDA-event time; do_bench zeroes 256 MB before each call (cold L2)."""
    return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")


_L2_FLUSH = []


def jax_cold_ms(fn, rep_ms, min_iters=5, max_iters=50):
    """Median host time of one jitted call to `block_until_ready`, after zeroing 256 MB on the
    device (cold L2, as do_bench does); includes JAX's host dispatch."""
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


def peer_module():
    try:
        from vllm.models.minimax_m3.common.ops import sparse_attn
    except ImportError:
        return None
    return sparse_attn


def peer_inputs(case):
    """(packed cache, valid-first top-k, note): the case's data as the peer reads it, built
    outside any timed region; (None, None, note) where the peer cannot run on it.

    The packed cache is (num_blocks, num_kv_heads, block_size, 2 * head_size), K then V; rows
    are reordered valid-first because the peer walks only the first min(topk, visible
    blocks) entries of a row (a row with fewer valid entries would make it read sentinels).
    """
    if peer_module() is None:
        return None, None, "peer not importable (run tools/peer-setup.sh; PYTHONPATH=.peer)"
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


def _int32(x, device):
    return torch.as_tensor(np.asarray(x), dtype=torch.int32, device=device)


def peer_prefill_fn(case):
    """((call, output), None): the peer's prefill call on this case; (None, note) if it
    cannot run. call() returns the peer's own output buffer."""
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
    out = torch.empty_like(q)

    def call():
        peer.minimax_m3_sparse_attn(q, packed, p_topk, table, cu, seq, prefix, max_q,
                                    spec.num_kv_heads, spec.scale, out, k_scale=ks, v_scale=vs)
        return out
    return (call, out), None


def graph_cold_ms(fn):
    """Median time of one CUDA-graph replay of fn, L2 flushed before each (do_bench)."""
    return triton.testing.do_bench(capture_graph(fn).replay, return_mode="median")


def decode_cold(case, query_len, samples=256):
    """Decode figures beside the existing ones (issue 11): the seed's decode call
    (`torch_sparse.minimax_m3_sparse_attn_decode`) and the peer's, each as CUDA-graph replay
    with L2 flushed before every replay, and the peer's relative difference from ours on
    sampled tokens. Missing peer: its fields hold None and peer_note says why."""
    import torch_sparse
    spec, dec, dev = case.spec, case.md.decode, case.cache.device
    table, seq = _int32(dec.block_table, dev), _int32(dec.seq_lens, dev)
    out = torch.empty_like(case.q)
    ours = graph_cold_ms(lambda: torch_sparse.minimax_m3_sparse_attn_decode(
        case.q, case.cache, case.topk, table, seq, spec.num_kv_heads, spec.scale, out,
        query_len))
    res = dict(torch_graph_cold_ms=ours, peer_graph_cold_ms=None, peer_vs_torch_err=None)
    packed, p_topk, note = peer_inputs(case)
    if note:
        res["peer_note"] = note
        return res
    p_out = torch.empty_like(case.q)
    p_out.fill_(float("nan"))
    res["peer_graph_cold_ms"] = graph_cold_ms(lambda: peer_module().minimax_m3_sparse_attn_decode(
        case.q, packed, p_topk, table, seq, spec.num_kv_heads, spec.scale, p_out, query_len))
    idx = np.unique(np.linspace(0, case.q.shape[0] - 1, samples).astype(np.int64))
    res["peer_vs_torch_err"] = relative_error(_sample(p_out, idx), _sample(out, idx))
    return res


def mosaic_note():
    """None where jax_sparse's Mosaic GPU kernels can run here, else why not."""
    try:
        from jax_sparse.mosaic import mosaic_unavailable_reason
    except ImportError as e:
        return f"jax_sparse has no Mosaic GPU kernels ({e})"
    return mosaic_unavailable_reason()


def decode_mosaic(case, samples=256):
    """The JAX call on the Mosaic GPU kernel (issue 13): one call and steady state, and its
    relative difference from the Pallas (Triton) call on sampled tokens; None figures and a
    mosaic_note where it cannot run."""
    res = dict(mosaic_ms=None, mosaic_pipelined_ms=None, mosaic_vs_pallas_err=None)
    note = mosaic_note()
    if note:
        res["mosaic_note"] = note
        return res
    fn = case.jax_fn(implementation="mosaic")
    idx = np.unique(np.linspace(0, case.q.shape[0] - 1, samples).astype(np.int64))
    res["mosaic_vs_pallas_err"] = relative_error(
        _sample(fn(), idx), _sample(case.jax_fn(implementation="pallas")(), idx))
    res["mosaic_ms"] = jax_median_ms(fn)
    res["mosaic_pipelined_ms"] = jax_pipelined_ms(fn)
    return res


def path_call(case, path):
    """((call, torch output buffer or None), None) for one prefill path, or (None, note).

    call() runs the path once and returns its full output. A front end without the
    `prefill_algorithm` keyword yet runs "token" as its default call and skips the rest.
    "mosaic": JAX on the Mosaic GPU kernel (implementation="mosaic").
    """
    if path == "peer":
        return peer_prefill_fn(case)
    if path == "mosaic":
        note = mosaic_note()
        return (None, note) if note else ((case.jax_fn(implementation="mosaic"), None), None)
    fw, alg = path.split(":")
    if fw == "torch":
        import torch_sparse
        front, make = torch_sparse.sparse_attention, case.torch_fn
    else:
        import jax_sparse
        front, make = jax_sparse.sparse_attention, case.jax_fn
    if not _accepts(front, "prefill_algorithm"):
        if alg != "token":
            return None, f"{fw} front end has no prefill_algorithm keyword yet"
        alg = None  # today's call: every prefill token on the per-token kernel
    fn = make(alg)
    if fw == "torch":
        out = case.out
        return (lambda: (fn(), out)[1], out), None
    return (fn, None), None


def sampled_reference(case, idx):
    """float64 [len(idx), num_heads, head_size]: interop.reference_attention on sampled rows."""
    md = case.md
    rows = types.SimpleNamespace(token_positions=md.token_positions[idx],
                                 token_to_req=md.token_to_req[idx], block_table=md.block_table)
    scales = [None if s is None else float(s) for s in (case.k_scale, case.v_scale)]
    q = case.q[torch.from_numpy(idx).to(case.q.device)]
    return interop.reference_attention(case.spec, q, case.cache, case.topk_np[:, idx], rows,
                                       *scales)


def _sample(out, idx):
    """The sampled rows of a path's output as NumPy (either framework)."""
    if isinstance(out, torch.Tensor):
        return out[torch.from_numpy(idx).to(out.device)].float().cpu().numpy()
    return np.asarray(out[idx]).astype(np.float32)


def prefill_case(args, spec, shape, selection, rng, rows):
    """Time every selected path on one prefill batch; the row is saved after every figure."""
    ql, sl = (SMOKE_SHAPES if args.smoke else PREFILL_SHAPES)[shape]
    case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1, rho=SELECTIONS[selection],
                scales=FP8_SCALES if spec.is_fp8 else None, device=args.device)
    n = case.md.num_tokens
    idx = np.unique(np.linspace(0, n - 1, min(args.samples, n)).round().astype(np.int64))
    row = dict(kind="prefill", heads=f"{spec.num_heads}/{spec.num_kv_heads}",
               cache=spec.kv_cache_dtype, shape=shape, selection=selection, tokens=n,
               context=sl[0] - ql[0], flops=case.flops,
               union8=mean_tile_union(case.topk_np, case.md), sampled_rows=len(idx), paths={})
    rows.append(row)
    ref = sampled_reference(case, idx)
    # The cross-check's baseline: the per-token PyTorch kernel on the same data.
    (base_call, base_buf), _ = path_call(case, "torch:token")
    base_buf.fill_(float("nan"))
    base = _sample(base_call(), idx)
    row["token_vs_f64_err"] = relative_error(base, ref)
    for path in args.paths:
        res = row["paths"][path] = {}
        try:
            made, note = path_call(case, path)
            if made is None:
                res["note"] = note
            else:
                _measure_path(args, case, path, made, idx, base, ref, res)
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            res["note"] = f"{type(e).__name__}: {str(e)[:300]}"
        _save_partial(args, rows)
        log(f"  {path}: " + (f"{res['ms']:.3f} ms, {res['tflops']:.0f} TFLOP/s, err vs token "
                             f"{res['err_vs_token']:.1e}" if "tflops" in res else res["note"]))
    _prefill_ratios(row)
    _save_partial(args, rows)
    del case
    if not args.smoke:
        torch.cuda.empty_cache()


def _measure_path(args, case, path, made, idx, base, ref, res):
    """Cross-check one path on the sampled rows (base: the token path's, ref: float64), then
    time it; fills res."""
    call, buf = made
    if buf is not None:
        buf.fill_(float("nan"))  # an unwritten row shows as inf below
    t0 = time.perf_counter()
    out = call()
    if args.smoke:  # one interpreted call: its host time stands in for a figure
        res["ms"] = (time.perf_counter() - t0) * 1e3
    got = _sample(out, idx)
    del out
    res["err_vs_token"] = relative_error(got, base)
    res["err_vs_f64"] = relative_error(got, ref)
    if not args.smoke:
        res["ms"] = (jax_cold_ms(call, args.rep_ms) if path.startswith(("jax", "mosaic"))
                     else torch_cold_ms(call, args.rep_ms))
    res["tflops"] = case.flops / (res["ms"] * 1e-3) / 1e12


def _prefill_ratios(row):
    """Speed against the same framework's per-token path (the peer: PyTorch's) and the peer,
    all from this run (> 1: faster)."""
    ms = {p: r["ms"] for p, r in row["paths"].items() if "tflops" in r}
    for path, res in row["paths"].items():
        if path not in ms:
            continue
        token = {"peer": "torch", "mosaic": "jax"}.get(path, path.split(":")[0]) + ":token"
        res["speedup_vs_token"] = ms[token] / ms[path] if token in ms else None
        res["speedup_vs_peer"] = ms["peer"] / ms[path] if "peer" in ms else None


def prefill_rows(args, rng, rows):
    for heads in args.heads:
        nh, nkv = map(int, heads.split("/"))
        for cd in args.caches:
            spec = interop.SparseAttentionSpec(nh, nkv, kv_cache_dtype=cd)
            for shape in args.shapes:
                for selection in args.selections:
                    log(f"prefill {heads} {cd} {shape} {selection}:")
                    prefill_case(args, spec, shape, selection, rng, rows)


def _save_partial(args, rows):
    """Every row so far, so a run cut short still leaves its figures."""
    with open(os.path.join(args.out, "bench_partial.json"), "w") as f:
        json.dump(dict(args.meta, rows=rows, partial=True), f, indent=1)


def run(args):
    import jax
    rng = np.random.default_rng(0)
    dev_name = "CPU, interpreters (--smoke)" if args.smoke else torch.cuda.get_device_name()
    log(f"device: {dev_name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"jax {jax.__version__}")
    ceil = None
    if not args.smoke:
        ceil = ceilings()
        log(f"ceilings: copy {ceil['copy_tbs']:.2f} TB/s, bf16 matmul "
            f"{ceil['matmul_bf16_tflops']:.0f} TFLOP/s")
    args.meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                     jax=jax.__version__, ceilings=ceil, vllm=vllm_version())
    rows = []
    heads_list = [(64, 4), (16, 1)]
    cache_dtypes = ["auto", "fp8_e4m3"]
    batches = [1, 16, 64, 256] if not args.quick else [1, 64, 256]
    qlens = [1, 2] if not args.quick else [1]
    ctx = args.context
    if "decode" in args.only:
        for nh, nkv in heads_list:
            for cd in cache_dtypes:
                for L in qlens:
                    for b in batches:
                        spec = interop.SparseAttentionSpec(nh, nkv, kv_cache_dtype=cd)
                        case = Case(spec, [L] * b, [ctx] * b, rng, decode_query_len=L)
                        err = case.check()
                        t_eager = triton.testing.do_bench(case.torch_fn(), return_mode="median")
                        t_graph = triton.testing.do_bench_cudagraph(case.torch_fn(),
                                                                   return_mode="median")
                        t_jax = jax_median_ms(case.jax_fn())
                        t_jax_pipe = jax_pipelined_ms(case.jax_fn())
                        row = dict(kind="decode", heads=f"{nh}/{nkv}", cache=cd, batch=b,
                                   query_len=L, context=ctx, bytes=case.kv_bytes,
                                   torch_ms=t_eager, torch_graph_ms=t_graph, jax_ms=t_jax,
                                   jax_pipelined_ms=t_jax_pipe, torch_vs_jax_err=err)
                        row.update(decode_mosaic(case))
                        row.update(decode_cold(case, L))
                        for k in ("torch", "torch_graph", "jax", "jax_pipelined",
                                  "torch_graph_cold", "peer_graph_cold", "mosaic",
                                  "mosaic_pipelined"):
                            t = row[f"{k}_ms"]
                            row[f"{k}_tbs"] = None if t is None else case.kv_bytes / (t * 1e-3) / 1e12
                        peer = PEER_DECODE_US.get((row["heads"], b)) if cd == "auto" and L == 1 else None
                        row["peer_us"] = peer
                        rows.append(row)
                        _save_partial(args, rows)
                        log(f"decode {nh}/{nkv} {cd} L={L} batch {b}: torch {t_eager*1e3:.0f} us "
                            f"(graph {t_graph*1e3:.0f} us, {row['torch_graph_tbs']:.2f} TB/s), "
                            f"jax {t_jax*1e3:.0f} us, steady {t_jax_pipe*1e3:.0f} us "
                            f"({row['jax_pipelined_tbs']:.2f} TB/s), err {err:.1e}; "
                            f"mosaic {_us(row['mosaic_ms'])}, steady "
                            f"{_us(row['mosaic_pipelined_ms'])}; "
                            f"cold-L2 graphs: seed call {row['torch_graph_cold_ms']*1e3:.1f} us, "
                            f"peer {_us(row['peer_graph_cold_ms'])}")
                        del case
                        torch.cuda.empty_cache()
    if "prefill" in args.only:
        prefill_rows(args, rng, rows)
    return dict(args.meta, rows=rows)


def table(result):
    c = result["ceilings"]
    ceil_text = ("no ceilings (--smoke)" if c is None else
                 f"measured ceilings: copy {c['copy_tbs']:.2f} TB/s, bf16 matmul "
                 f"{c['matmul_bf16_tflops']:.0f} TFLOP/s")
    lines = [f"Device: {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"jax {result['jax']}); {ceil_text}; vllm: "
             f"{result['vllm'] or 'not importable (decode peer = PERF.md figures, H100)'}"]
    decode = [r for r in result["rows"] if r["kind"] == "decode"]
    if decode:
        lines += ["", "Decode. Cold-L2 graph: CUDA-graph replay of the seed's decode call "
                  "(peer: its own), L2 flushed before each replay; x peer: speed over the peer "
                  "in this run; err: the peer against ours on sampled tokens. The other "
                  "columns replay back to back (warm L2) or time eager calls.", "",
                  "| decode | heads | cache | L | batch | torch eager | torch graph (TB/s, of copy) | jax call | jax steady (TB/s) | jax/torch speed: call/eager, steady/graph | peer / torch eager (PERF.md) | torch cold-L2 graph (TB/s) | peer cold-L2 graph (TB/s) | x peer | err | mosaic call | mosaic steady (TB/s) | mosaic / pallas steady speed | mosaic err vs pallas |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode:
        lines.append(f"| | {r['heads']} | {r['cache']} | {r['query_len']} | {r['batch']} | "
                     f"{r['torch_ms']*1e3:.0f} us | {r['torch_graph_ms']*1e3:.0f} us "
                     f"({r['torch_graph_tbs']:.2f}, {r['torch_graph_tbs']/c['copy_tbs']:.0%}) | "
                     f"{r['jax_ms']*1e3:.0f} us | {r['jax_pipelined_ms']*1e3:.0f} us "
                     f"({r['jax_pipelined_tbs']:.2f}) | {r['torch_ms']/r['jax_ms']:.2f}, "
                     f"{r['torch_graph_ms']/r['jax_pipelined_ms']:.2f} | "
                     f"{_ratio(r['peer_us'], r['torch_ms']*1e3)} | "
                     f"{_us_tbs(r, 'torch_graph_cold')} | {_us_tbs(r, 'peer_graph_cold')} | "
                     f"{_fmt(_speed(r.get('peer_graph_cold_ms'), r.get('torch_graph_cold_ms')))} | "
                     f"{_fmt(r.get('peer_vs_torch_err'), '.1e')} | {_us(r.get('mosaic_ms'))} | "
                     f"{_us_tbs(r, 'mosaic_pipelined')} | "
                     f"{_fmt(_speed(r['jax_pipelined_ms'], r.get('mosaic_pipelined_ms')))} | "
                     f"{_fmt(r.get('mosaic_vs_pallas_err'), '.1e')} |")
    prefill = [r for r in result["rows"] if r["kind"] == "prefill" and "paths" in r]  # this format
    if prefill:
        lines += ["", *prefill_tables(prefill, None if c is None else c["matmul_bf16_tflops"])]
    return "\n".join(lines)


def _case_label(r):
    return f"{r['heads']} | {r['cache']} | {r['shape']} | {r['selection']} | {r['union8']:.1f}"


def prefill_tables(rows, matmul_tflops):
    """A summary (useful TFLOP/s of every path per case) and one line per (case, path)."""
    paths = [p for p in PREFILL_PATHS if any(p in r["paths"] for r in rows)]
    lines = ["Prefill, useful TFLOP/s (cold L2; '-': not run, see the detail table). union8: "
             "mean distinct blocks per 8-token tile and KV head.", "",
             "| heads | cache | shape | selection | union8 | " + " | ".join(paths) + " |",
             "|---|---|---|---|---|" + "---|" * len(paths)]
    for r in rows:
        cells = [f"{r['paths'][p]['tflops']:.0f}" if "tflops" in r["paths"].get(p, {}) else "-"
                 for p in paths]
        lines.append(f"| {_case_label(r)} | " + " | ".join(cells) + " |")
    lines += ["", "Detail. x token: speed over the same framework's per-token path (the peer: "
              "over PyTorch's); x peer: over the peer's prefill kernel; both from this run. "
              "err: relative error on the sampled rows against the per-token PyTorch kernel "
              "(its own line: against the float64 reference); '!' marks err > 1e-2.", "",
              "| heads | cache | shape | selection | union8 | path | time | TFLOP/s (of matmul) "
              "| x token | x peer | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in paths:
            res = r["paths"].get(p)
            if res is None:
                continue
            if "tflops" not in res:
                lines.append(f"| {_case_label(r)} | {p} | - | {res.get('note', '')} | | | |")
                continue
            of = "" if matmul_tflops is None else f", {res['tflops'] / matmul_tflops:.0%}"
            err = r["token_vs_f64_err"] if p == "torch:token" else res["err_vs_token"]
            lines.append(
                f"| {_case_label(r)} | {p} | {res['ms']:.3f} ms | {res['tflops']:.0f}{of} | "
                f"{_fmt(res.get('speedup_vs_token'))} | {_fmt(res.get('speedup_vs_peer'))} | "
                f"{err:.1e}{' !' if err > 1e-2 else ''} |")
    return lines


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _speed(theirs_ms, ours_ms):
    return None if theirs_ms is None or ours_ms is None else theirs_ms / ours_ms


def _us(ms):
    return "-" if ms is None else f"{ms * 1e3:.1f} us"


def _us_tbs(row, key):
    """'12.9 us (1.57)': a decode time and its TB/s, '-' where the row lacks it."""
    ms = row.get(f"{key}_ms")
    return "-" if ms is None else f"{_us(ms)} ({row[f'{key}_tbs']:.2f})"


def _ratio(peer, ours):
    """Speed of ours relative to the peer (> 1: faster), or '-' where the peer has no row."""
    return "-" if peer is None else f"{peer / ours:.2f}"


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    groups = {}
    for r in result["rows"]:
        if r["kind"] == "decode" and r["query_len"] == 1:
            for path_name, key in (("torch graph", "torch_graph_tbs"),
                                   ("jax steady", "jax_pipelined_tbs"),
                                   ("mosaic steady", "mosaic_pipelined_tbs")):
                if r.get(key) is not None:
                    groups.setdefault((r["heads"], r["cache"], path_name), []).append(
                        (r["batch"], r[key]))
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (heads, cache, name), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle={"jax": "-", "mosaic": ":"}.get(name.split()[0], "--"),
                label=f"{name} {heads} {cache}")
    ax.axhline(result["ceilings"]["copy_tbs"], color="k", linewidth=0.8, label="copy ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (requests, 32k tokens each)")
    ax.set_ylabel("K/V bytes read / time (TB/s)")
    ax.set_title(f"Decode bandwidth, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _list(text):
    return [x for x in text.split(",") if x]


def load_result(path):
    """A result of this script: a folder's bench.json (else bench_partial.json), or a file."""
    if os.path.isdir(path):
        full = os.path.join(path, "bench.json")
        path = full if os.path.exists(full) else os.path.join(path, "bench_partial.json")
    with open(path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rows: decode batches 1/64/256 at L=1; prefill 64/4, bf16, 16k "
                         "and 4x2k+8k (each filter below still applies)")
    ap.add_argument("--only", default="decode,prefill", help="sections: decode, prefill")
    ap.add_argument("--context", type=int, default=32768, help="decode context (tokens)")
    ap.add_argument("--heads", help="prefill heads, e.g. 64/4,16/1 (default: both)")
    ap.add_argument("--caches", help="prefill cache dtypes: auto (bf16), fp8_e4m3 (default: both)")
    ap.add_argument("--shapes", help=f"prefill shapes: {', '.join(PREFILL_SHAPES)} (default: all)")
    ap.add_argument("--selections", help=f"{', '.join(SELECTIONS)} (default: both)")
    ap.add_argument("--paths", default=",".join(PREFILL_PATHS),
                    help="prefill paths (default: all): " + ", ".join(PREFILL_PATHS))
    ap.add_argument("--samples", type=int, default=64,
                    help="rows of each prefill output checked against the token path")
    ap.add_argument("--rep-ms", type=int, default=300, help="timed span of each prefill figure")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny prefill rows on CPU (Triton interpreter, Pallas interpret mode): "
                         "tests the code path, measures nothing; default 16/1, both caches, "
                         "2x24+136, rho0.87 (about 2 min); --shapes 1x136 adds a longer one")
    ap.add_argument("--merge", nargs="+", metavar="RESULT",
                    help="only write the tables of these results (folders or json files) together")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        parts = [load_result(p) for p in args.merge]
        result = dict(parts[0], rows=[r for part in parts for r in part["rows"]])
        result.pop("partial", None)
    else:
        defaults = dict(heads="64/4,16/1", caches="auto,fp8_e4m3", shapes=",".join(PREFILL_SHAPES),
                        selections=",".join(SELECTIONS))
        if args.quick:
            defaults.update(heads="64/4", caches="auto", shapes="16k,4x2k+8k")
        if args.smoke:
            defaults.update(heads="16/1", shapes="2x24+136", selections="rho0.87")
            args.only = "prefill"
        for name, value in defaults.items():
            setattr(args, name, _list(getattr(args, name) or value))
        args.only, args.paths = _list(args.only), _list(args.paths)
        unknown = [p for p in args.paths if p not in PREFILL_PATHS]
        if unknown:
            sys.exit(f"unknown paths {unknown}; expected some of {list(PREFILL_PATHS)}")
        args.device = "cpu" if args.smoke else "cuda"
        if not args.smoke and not torch.cuda.is_available():
            sys.exit("the benchmark needs a CUDA GPU (or --smoke)")
        result = run(args)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = table(result)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(text + "\n")
    plot(result, os.path.join(args.out, "decode_bandwidth.png"))
    print(text)


if __name__ == "__main__":
    main()
