"""Benchmark both paths against the measured ceilings (and vLLM's kernels when importable).

    python benchmarks/bench.py --out bench_out            # the full sweep (H100: ~5 min)
    python benchmarks/bench.py --quick --out bench_out    # a few rows

Decode: one query token (or 2, speculative) per request, every request at 32k tokens; bytes =
the K/V bytes of the selected blocks each (token, KV head) row reads. Prefill: useful FLOPs =
4 * head_size * sum over (token, query head) of the keys it attends. Medians of CUDA-event
timings (`triton.testing.do_bench`) for PyTorch, eager and as CUDA-graph replay for decode;
`block_until_ready` timings of one jitted call for JAX, and its steady state (calls queued
back to back). Writes a table, `bench.json` (every
figure and the device) and `decode_bandwidth.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Run from a checkout without installing: the packages live one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import interop  # noqa: E402
from interop.testing import make_topk, random_block_table  # noqa: E402

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
    """One batch on the GPU, shared by both paths (the JAX side views the same cache)."""

    def __init__(self, spec, query_lens, seq_lens, rng, decode_query_len=1):
        import jax
        table, num_blocks = random_block_table(seq_lens, rng, block_size=BS, spare_blocks=1)
        md = interop.build_metadata(query_lens, seq_lens, table,
                                    decode_query_len=decode_query_len, num_blocks=num_blocks)
        self.spec, self.md = spec, md
        topk = make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng)
        dev = torch.device("cuda")
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
        self.j_md = interop.to_jax(md, jax.devices("gpu")[0])
        valid = interop.metadata.valid_topk_mask(topk, md.token_positions, BS)
        self.rows_blocks = int(valid.sum())  # selected (token, kv head, block) triples
        pos = md.token_positions[None, :, None]
        keys = np.clip(pos - topk * BS + 1, 0, BS) * valid
        self.keys_attended = int(keys.sum()) * spec.num_queries_per_kv  # over query heads
        self.kv_bytes = self.rows_blocks * BS * spec.head_size * 2 * self.cache.element_size()
        self.flops = 4 * spec.head_size * self.keys_attended

    def torch_fn(self):
        import torch_sparse
        spec, q, cache, topk, md, out = self.spec, self.q, self.cache, self.topk, self.t_md, self.out
        return lambda: torch_sparse.sparse_attention(spec, q, cache, topk, md, out)

    def jax_fn(self):
        import jax_sparse
        f = jax_sparse.sparse_attention  # jitted inside
        spec, q, cache, topk, md = self.spec, self.j_q, self.j_cache, self.j_topk, self.j_md
        return lambda: f(spec, q, cache, topk, md)

    def check(self, samples=256):
        """Relative difference of the two paths on sampled tokens (guards against timing garbage)."""
        self.torch_fn()()
        j_out = self.jax_fn()()
        idx = np.unique(np.linspace(0, self.q.shape[0] - 1, samples).astype(np.int64))
        j = np.asarray(j_out[idx]).astype(np.float32)
        t = self.out[torch.from_numpy(idx).cuda()].float().cpu().numpy()
        return float(np.linalg.norm(t - j) / max(np.linalg.norm(t), 1e-30))


# The peer (vLLM 0.33's Triton MiniMax-M3 kernels, bf16 cache, L=1) as ../shared/PERF.md
# reports it on an H100 80GB: vllm is not installed on the device machine, so its kernels
# cannot run beside ours; ratios against these figures hold only on that device.
PEER_DECODE_US = {("64/4", 1): 56, ("64/4", 16): 56, ("64/4", 64): 112, ("64/4", 256): 394,
                  ("16/1", 64): 45, ("16/1", 256): 112}
PEER_PREFILL_MS = {("64/4", 4096): 1.77, ("64/4", 16384): 8.98, ("64/4", 65536): 39.0,
                   ("16/1", 65536): 9.66}


def vllm_version():
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def _save_partial(args, rows):
    """Every row so far, so a run cut short still leaves its figures."""
    with open(os.path.join(args.out, "bench_partial.json"), "w") as f:
        json.dump(rows, f, indent=1)


def run(args):
    import jax
    rng = np.random.default_rng(0)
    dev_name = torch.cuda.get_device_name()
    log(f"device: {dev_name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"jax {jax.__version__}")
    ceil = ceilings()
    log(f"ceilings: copy {ceil['copy_tbs']:.2f} TB/s, bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s")
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
                        for k in ("torch", "torch_graph", "jax", "jax_pipelined"):
                            row[f"{k}_tbs"] = case.kv_bytes / (row[f"{k}_ms"] * 1e-3) / 1e12
                        peer = PEER_DECODE_US.get((row["heads"], b)) if cd == "auto" and L == 1 else None
                        row["peer_us"] = peer
                        rows.append(row)
                        _save_partial(args, rows)
                        log(f"decode {nh}/{nkv} {cd} L={L} batch {b}: torch {t_eager*1e3:.0f} us "
                            f"(graph {t_graph*1e3:.0f} us, {row['torch_graph_tbs']:.2f} TB/s), "
                            f"jax {t_jax*1e3:.0f} us, steady {t_jax_pipe*1e3:.0f} us "
                            f"({row['jax_pipelined_tbs']:.2f} TB/s), err {err:.1e}")
                        del case
                        torch.cuda.empty_cache()
    if "prefill" in args.only:
        sizes = [(4096, 0), (16384, 0), (65536, 0)] if not args.quick else [(16384, 0)]
        batch_ctx = ([2048] * 4, [8192] * 4)
        for nh, nkv in heads_list:
            for cd in cache_dtypes:
                shapes = [([n], [n]) for n, _ in sizes]
                if not args.quick:
                    shapes.append((batch_ctx[0], [q + c for q, c in zip(*batch_ctx)]))
                for ql, sl in shapes:
                    spec = interop.SparseAttentionSpec(nh, nkv, kv_cache_dtype=cd)
                    case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1)
                    err = case.check()
                    t_torch = triton.testing.do_bench(case.torch_fn(), return_mode="median")
                    t_jax = jax_median_ms(case.jax_fn(), iters=10)
                    label = f"{len(ql)}x{ql[0]}" + (f"+{sl[0]-ql[0]}ctx" if sl[0] > ql[0] else "")
                    row = dict(kind="prefill", heads=f"{nh}/{nkv}", cache=cd, shape=label,
                               tokens=sum(ql), flops=case.flops, torch_ms=t_torch, jax_ms=t_jax,
                               torch_tflops=case.flops / (t_torch * 1e-3) / 1e12,
                               jax_tflops=case.flops / (t_jax * 1e-3) / 1e12,
                               torch_vs_jax_err=err)
                    row["peer_ms"] = (PEER_PREFILL_MS.get((row["heads"], ql[0]))
                                      if cd == "auto" and len(ql) == 1 else None)
                    rows.append(row)
                    _save_partial(args, rows)
                    log(f"prefill {nh}/{nkv} {cd} {label}: torch {t_torch:.2f} ms "
                        f"({row['torch_tflops']:.0f} TFLOP/s), jax {t_jax:.2f} ms "
                        f"({row['jax_tflops']:.0f} TFLOP/s), err {err:.1e}")
                    del case
                    torch.cuda.empty_cache()
    return dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                jax=jax.__version__, ceilings=ceil, vllm=vllm_version(), rows=rows)


def table(result):
    c = result["ceilings"]
    lines = [f"Device: {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"jax {result['jax']}); measured ceilings: copy {c['copy_tbs']:.2f} TB/s, "
             f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s; vllm: "
             f"{result['vllm'] or 'not importable (peer = PERF.md figures, H100)'}", "",
             "| decode | heads | cache | L | batch | torch eager | torch graph (TB/s, of copy) | jax call | jax steady (TB/s) | jax/torch speed: call/eager, steady/graph | peer / torch eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] != "decode":
            continue
        lines.append(f"| | {r['heads']} | {r['cache']} | {r['query_len']} | {r['batch']} | "
                     f"{r['torch_ms']*1e3:.0f} us | {r['torch_graph_ms']*1e3:.0f} us "
                     f"({r['torch_graph_tbs']:.2f}, {r['torch_graph_tbs']/c['copy_tbs']:.0%}) | "
                     f"{r['jax_ms']*1e3:.0f} us | {r['jax_pipelined_ms']*1e3:.0f} us "
                     f"({r['jax_pipelined_tbs']:.2f}) | {r['torch_ms']/r['jax_ms']:.2f}, "
                     f"{r['torch_graph_ms']/r['jax_pipelined_ms']:.2f} | "
                     f"{_ratio(r['peer_us'], r['torch_ms']*1e3)} |")
    lines += ["", "| prefill | heads | cache | shape | torch (TFLOP/s, of matmul) | jax (TFLOP/s) | jax speed / torch | peer / torch |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] != "prefill":
            continue
        lines.append(f"| | {r['heads']} | {r['cache']} | {r['shape']} | {r['torch_ms']:.2f} ms "
                     f"({r['torch_tflops']:.0f}, {r['torch_tflops']/c['matmul_bf16_tflops']:.0%}) | "
                     f"{r['jax_ms']:.2f} ms ({r['jax_tflops']:.0f}) | {r['torch_ms']/r['jax_ms']:.2f} | "
                     f"{_ratio(r['peer_ms'], r['torch_ms'])} |")
    return "\n".join(lines)


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
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in result["rows"]:
        if r["kind"] == "decode" and r["query_len"] == 1:
            for path_name, key in (("torch graph", "torch_graph_tbs"),
                                   ("jax steady", "jax_pipelined_tbs")):
                groups.setdefault((r["heads"], r["cache"], path_name), []).append((r["batch"], r[key]))
    for (heads, cache, name), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if name.startswith("jax") else "--", label=f"{name} {heads} {cache}")
    ax.axhline(result["ceilings"]["copy_tbs"], color="k", linewidth=0.8, label="copy ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (requests, 32k tokens each)")
    ax.set_ylabel("K/V bytes read / time (TB/s)")
    ax.set_title(f"Decode bandwidth, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="decode,prefill")
    ap.add_argument("--context", type=int, default=32768)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
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
