"""Decode as a model calls it: N layers in one step, per-layer time against batch.

    python benchmarks/model_step.py --out model_step.jsonl          # the full grid (~5 min, H100)
    python benchmarks/model_step.py --quick --out /tmp/ms.jsonl     # one small config
    python benchmarks/model_step.py --smoke --out /tmp/ms.jsonl     # CPU, interpreters, tiny

Each of N layers (--layers, default 8 and 32) has its own paged cache, queries, top-k and
output; the metadata (block table, sequence lengths) is built once per batch and shared, as a
model's metadata builder does. Every request decodes one token at 32k tokens of context
(256 logical blocks); each (token, KV head) selects its own block plus 15 random older blocks
(`interop.testing.make_topk`). Head 128, block 128, top-k 16; bf16 queries; bf16 or FP8 e4m3
caches (no scales).

Memory: 32 layers of full 32k contexts at batch 256 would not fit, so every layer's cache holds
a bounded number of pages (--cache-gb over all layers, allocated once per heads x cache dtype
for the largest layer count and shared by every batch): the block table maps each request's
256 logical blocks onto distinct random pages of that bound (fewer pages: min(batch * 256,
bound)), the same table for every layer, as in a model. Where the bound is below batch * 256
pages, some selected (page, KV head) tiles repeat within a layer; the rows report the distinct
share. One cache buffer serves both frameworks (a zero-copy DLPack view), so nothing is held
twice.

What runs:
- PyTorch: one CUDA graph of the N layer calls of `torch_sparse.sparse_attention`, and one of
  the seed's decode call `torch_sparse.minimax_m3_sparse_attn_decode`; `triton.testing.do_bench`
  on `graph.replay` (it zeroes 256 MB before every replay: cold L2), median.
- JAX: one `jax.jit` step taking the N layers' queries, caches and top-k as lists plus the
  metadata pytree, calling `jax_sparse.sparse_attention` once per layer, returning N outputs.
  Cold L2 (the headline): K iterations of [a jitted 256 MB zero-fill (its buffer donated), the
  step] are queued back to back with one wait at the end, and so are K fills alone; the step's
  time is the difference per iteration (median over rounds). Queued this way the device runs
  without gaps while the host dispatches ahead, as in a serving loop, so the figure is device
  time like the graph replay's (the row's `jax_host_share` is the share of the span the host
  spent dispatching: near 1 would mean host-bound, an overestimate of the step). Warm: the
  step alone queued back to back (L2 keeps what fits). The first call (trace + compile + one
  run) is timed separately and printed.
- Per-layer time = step time / N. Bytes per layer: the K/V bytes of the valid selected pages
  (batch x KV heads x 16 x 2 x block x head x itemsize) plus the query and output.
- Checks, every config: outputs poisoned with NaN first; layer 0 and layer N-1 of the graph
  against the float32 device reference (`torch_sparse.eager`), the seed call's graph and
  the JAX step against the graph of `sparse_attention` on every layer. An error > 1e-2 is
  marked '!'.

Target: JAX per-layer cold time <= 1.1x PyTorch's per-layer graph time at every batch and
cache dtype (a model step should cost the same in either framework); the table prints both
ratios (against `sparse_attention` and against the seed call) from this run.

Output: --out FILE gets one JSON line per config as soon as it is measured (a header line
first), FILE.md the markdown table, also printed at the end. A config that fails records its
error and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback

from harness import (capture_graph, jax_attention, torch_attention,  # first: the environment
                     torch_seed_decode)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402
from interop.testing import make_topk, relative_error  # noqa: E402

BS = 128
CACHES = {"bf16": "bfloat16", "fp8_e4m3": "fp8_e4m3"}
FLUSH_BYTES = 256 << 20  # as triton.testing.do_bench
ERR_LIMIT = 1e-2


def log(*a):
    print(*a, flush=True)


class Shapes:
    """The run's sizes: MiniMax-M3's, or tiny ones for --smoke (CPU, interpreters)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.context = 640 if smoke else 32768      # tokens per request
        self.topk = 4 if smoke else 16
        self.device = "cpu" if smoke else "cuda"

    @property
    def blocks_per_request(self):
        return -(-self.context // BS)


class LayerCaches:
    """N layer caches of `num_pages` pages each (PyTorch logical views, random values; JAX
    physical views of the same buffers), allocated once per (heads, cache dtype)."""

    def __init__(self, spec, num_layers, num_pages, device):
        import jax
        self.spec, self.num_pages = spec, num_pages
        self.torch = []
        for _ in range(num_layers):
            cache = interop.allocate_torch_kv_cache(spec, num_pages, "bfloat16", device=device)
            phys = cache.permute(*spec.kv_cache_stride_order())
            for chunk in phys.split(max(1, num_pages // 8)):  # bounded temporary
                chunk.copy_(torch.randn(chunk.shape, device=device, dtype=torch.bfloat16))
            self.torch.append(cache)
        self.jax = [interop.kv_cache_to_jax(c, spec) for c in self.torch]
        jax.block_until_ready(self.jax)


def pages_per_layer(spec, num_layers, cache_gb, shapes, max_batch):
    """The per-layer page bound: the budget split over the layers, at most what the largest
    batch can address, at least one request's blocks."""
    if shapes.smoke:
        return shapes.blocks_per_request * max_batch
    page_bytes = 2 * BS * spec.num_kv_heads * spec.head_size * (1 if spec.is_fp8 else 2)
    bound = int(cache_gb * 2**30 // (num_layers * page_bytes))
    return max(shapes.blocks_per_request, min(bound, shapes.blocks_per_request * max_batch))


class Batch:
    """One decode batch over the layer caches: shared metadata, per-layer queries/top-k/outputs."""

    def __init__(self, spec, caches: LayerCaches, num_layers, batch, shapes, rng):
        import jax
        nbr = shapes.blocks_per_request
        used = min(batch * nbr, caches.num_pages)
        # Each request: distinct random pages among the first `used` ones.
        table = np.argsort(rng.random((batch, used)), axis=1)[:, :nbr].astype(np.int32)
        md = interop.build_metadata([1] * batch, [shapes.context] * batch, table,
                                    num_blocks=caches.num_pages)
        dev = torch.device(shapes.device)
        self.spec, self.md, self.num_layers, self.used_pages = spec, md, num_layers, used
        self.t_md = interop.to_torch(md, dev)
        self.block_table = self.t_md.decode.block_table
        self.seq_lens = self.t_md.decode.seq_lens
        self.j_md = interop.to_jax(md, jax.devices()[0])
        self.topk_np = [make_topk(md, spec.num_kv_heads, spec.topk_blocks, rng)
                        for _ in range(num_layers)]
        self.q = [torch.randn(batch, spec.num_heads, spec.head_size, device=dev,
                              dtype=torch.bfloat16) for _ in range(num_layers)]
        self.topk = [torch.from_numpy(t).to(dev) for t in self.topk_np]
        self.out = [torch.full_like(q, float("nan")) for q in self.q]        # sparse_attention
        self.out_seed = [torch.full_like(q, float("nan")) for q in self.q]   # the seed's call
        self.caches = caches.torch[:num_layers]
        self.j_caches = caches.jax[:num_layers]
        self.j_q = [interop.to_jax(q) for q in self.q]
        self.j_topk = [interop.to_jax(t) for t in self.topk]
        valid = interop.metadata.valid_topk_mask(self.topk_np[0], md.token_positions, BS)
        itemsize = 1 if spec.is_fp8 else 2
        q_bytes = batch * spec.num_heads * spec.head_size * 2
        self.bytes_per_layer = (int(valid.sum()) * 2 * BS * spec.head_size * itemsize
                                + 2 * q_bytes)  # K/V of the valid selections + query + output
        # Distinct (page, KV head) tiles among the selections of layer 0.
        g, t, k = np.nonzero(valid)
        pages = table[md.token_to_req[t], self.topk_np[0][g, t, k]]
        self.distinct = len(np.unique(pages.astype(np.int64) * spec.num_kv_heads + g)) / len(g)

    def torch_step(self):
        for i in range(self.num_layers):
            torch_attention(self.spec, self.q[i], self.caches[i], self.topk[i], self.t_md,
                            self.out[i])

    def seed_step(self):
        for i in range(self.num_layers):
            torch_seed_decode(self.spec, self.q[i], self.caches[i], self.topk[i],
                              self.block_table, self.seq_lens, self.out_seed[i], 1)

    def reference(self, layer):
        """float32 [batch, heads, head] on the device: gathers of the selected pages only."""
        from torch_sparse.eager import sparse_attention_eager
        ref = torch.empty(self.q[layer].shape, dtype=torch.float32, device=self.q[layer].device)
        sparse_attention_eager(self.q[layer], self.caches[layer], self.topk[layer],
                               self.t_md.block_table, self.t_md.token_to_req,
                               self.t_md.token_positions, ref, self.spec.scale)
        return ref


# --- PyTorch: CUDA graph of the N layer calls ---------------------------------------------------

def torch_graph_ms(step, outputs, smoke, rep_ms):
    """(median ms of one replay with L2 flushed before each, the graph); on --smoke one eager
    step timed on the host (no graphs on a CPU). `outputs` are poisoned with NaN before the
    replays, so an element no replay writes fails the checks."""
    if smoke:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3, None
    import triton
    graph = capture_graph(step, warmups=2)
    for out in outputs:
        out.fill_(float("nan"))
    ms = triton.testing.do_bench(graph.replay, rep=rep_ms, return_mode="median")
    return ms, graph


# --- JAX: one jitted step ------------------------------------------------------------------------

def make_jax_step(spec):
    import jax
    op = jax_attention(spec)

    def step(queries, caches, topks, metadata):
        return [op(q, c, t, metadata) for q, c, t in zip(queries, caches, topks)]
    return jax.jit(step)


class Flush:
    """A jitted zero-fill of a 256 MB buffer (donated, so the same memory every call)."""

    def __init__(self, nbytes):
        import jax
        import jax.numpy as jnp
        self._fill = jax.jit(jnp.zeros_like, donate_argnums=0)
        self.buf = jnp.ones((nbytes // 4,), jnp.float32)

    def __call__(self):
        self.buf = self._fill(self.buf)
        return self.buf


def queued_ms(calls, iters, rounds):
    """Median over rounds of (span of `iters` iterations queued back to back, one wait at the
    end) / iters, and the median share of that span the host spent dispatching. Each
    iteration runs every function of `calls` in order; the last result is waited on."""
    import jax
    spans, host = [], []
    for _ in range(rounds):
        jax.block_until_ready(calls[-1]())
        t0 = time.perf_counter()
        for _ in range(iters):
            for c in calls:
                last = c()
        t1 = time.perf_counter()
        jax.block_until_ready(last)
        t2 = time.perf_counter()
        spans.append((t2 - t0) * 1e3 / iters)
        host.append((t1 - t0) / (t2 - t0))
    return statistics.median(spans), statistics.median(host)


def jax_figures(b: Batch, smoke):
    """First-call, cold and warm figures of the jitted step; returns (dict, outputs)."""
    import jax
    step = make_jax_step(b.spec)
    args = (b.j_q, b.j_caches, b.j_topk, b.j_md)
    t0 = time.perf_counter()
    outs = jax.block_until_ready(step(*args))
    first_s = time.perf_counter() - t0
    call = lambda: step(*args)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    one_ms = (time.perf_counter() - t0) * 1e3
    if smoke:
        return dict(jax_first_call_s=first_s, jax_cold_ms=one_ms, jax_warm_ms=one_ms,
                    jax_flush_ms=0.0, jax_host_share=1.0), outs
    flush = Flush(FLUSH_BYTES)
    # About 40 ms per round, 3 to 50 iterations; 7 rounds.
    iters = int(min(50, max(3, 40 / max(one_ms, 1e-3))))
    flush_ms, _ = queued_ms([flush], iters, 7)
    both_ms, host = queued_ms([flush, call], iters, 7)
    warm_ms, warm_host = queued_ms([call], iters, 7)
    del flush
    return dict(jax_first_call_s=first_s, jax_cold_ms=both_ms - flush_ms, jax_warm_ms=warm_ms,
                jax_flush_ms=flush_ms, jax_host_share=host, jax_warm_host_share=warm_host,
                jax_iters=iters), outs


# --- one config ---------------------------------------------------------------------------------

def _err(a, b):
    """Relative error of a against b (torch tensors or JAX arrays), inf where a has NaN."""
    def host(x):
        return x.float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    return relative_error(host(a), host(b))


def run_config(args, spec, caches, heads, cache_name, num_layers, batch, rng):
    row = dict(heads=heads, cache=cache_name, layers=num_layers, batch=batch,
               context=args.shapes.context, pages_per_layer=caches.num_pages)
    b = Batch(spec, caches, num_layers, batch, args.shapes, rng)
    row.update(used_pages=b.used_pages, distinct_tiles=b.distinct,
               bytes_per_layer=b.bytes_per_layer)
    torch_ms, g1 = torch_graph_ms(b.torch_step, b.out, args.smoke, args.rep_ms)
    seed_ms, g2 = torch_graph_ms(b.seed_step, b.out_seed, args.smoke, args.rep_ms)
    row.update(torch_graph_cold_ms=torch_ms, seed_graph_cold_ms=seed_ms)
    errs = {}
    for layer in sorted({0, num_layers - 1}):
        errs[f"torch_vs_f32_layer{layer}"] = _err(b.out[layer], b.reference(layer))
    errs["seed_vs_torch"] = max(_err(s, o) for s, o in zip(b.out_seed, b.out))
    del g1, g2
    figures, j_outs = jax_figures(b, args.smoke)
    row.update(figures)
    errs["jax_vs_torch"] = max(_err(j, o) for j, o in zip(j_outs, b.out))
    del j_outs
    row["errors"] = errs
    row["max_err"] = max(errs.values())
    for key in ("torch_graph_cold", "seed_graph_cold", "jax_cold", "jax_warm"):
        per_layer_ms = row[f"{key}_ms"] / num_layers
        row[f"{key}_layer_us"] = per_layer_ms * 1e3
        row[f"{key}_tbs"] = b.bytes_per_layer / (per_layer_ms * 1e-3) / 1e12 if per_layer_ms > 0 else None
    row["jax_over_torch"] = row["jax_cold_ms"] / torch_ms
    row["jax_over_seed"] = row["jax_cold_ms"] / seed_ms
    del b
    return row


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(header, rows):
    lines = [f"Model-step decode, {header['device']} (torch {header['torch']}, jax "
             f"{header['jax']}); {header['context']}-token contexts, head 128, block 128, "
             f"top-k {header['topk']}. Per-layer time = step time / layers; cold L2 unless "
             "marked warm. JAX/PyTorch: the JAX step's cold time over the CUDA graph's "
             f"(target <= 1.10); '!' marks an error > {ERR_LIMIT}.", "",
             "| heads | cache | layers | batch | pages/layer (distinct tiles) | torch graph us "
             "(TB/s) | seed-call graph us (TB/s) | JAX step us (TB/s) | JAX/torch | JAX/seed | "
             "JAX warm us | JAX first call s | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['heads']} | {r['cache']} | {r['layers']} | {r['batch']} | "
                         f"FAILED: {r['error'][:120]} |||||||||")
            continue
        target = "" if r["jax_over_torch"] <= 1.10 else " (miss)"
        lines.append(
            f"| {r['heads']} | {r['cache']} | {r['layers']} | {r['batch']} | "
            f"{r['used_pages']} ({r['distinct_tiles']:.0%}) | "
            f"{r['torch_graph_cold_layer_us']:.1f} ({_fmt(r['torch_graph_cold_tbs'], '.2f')}) | "
            f"{r['seed_graph_cold_layer_us']:.1f} ({_fmt(r['seed_graph_cold_tbs'], '.2f')}) | "
            f"{r['jax_cold_layer_us']:.1f} ({_fmt(r['jax_cold_tbs'], '.2f')}) | "
            f"{r['jax_over_torch']:.2f}{target} | {r['jax_over_seed']:.2f} | "
            f"{r['jax_warm_layer_us']:.1f} | {r['jax_first_call_s']:.1f} | "
            f"{r['max_err']:.1e}{' !' if r['max_err'] > ERR_LIMIT else ''} |")
    return "\n".join(lines)


def _write(f, obj):
    f.write(json.dumps(obj) + "\n")
    f.flush()


def run(args):
    import jax
    shapes = args.shapes
    rng = np.random.default_rng(0)
    device = "CPU, interpreters (--smoke)" if args.smoke else torch.cuda.get_device_name()
    header = dict(kind="header", device=device, torch=torch.__version__, jax=jax.__version__,
                  context=shapes.context, topk=shapes.topk, layers=args.layers,
                  batches=args.batches, heads=args.heads, caches=args.caches,
                  cache_gb=args.cache_gb)
    log(f"device: {device}; torch {torch.__version__}, jax {jax.__version__}")
    rows, start = [], time.perf_counter()
    with open(args.out, "w") as f:
        _write(f, header)
        for heads in args.heads:
            nh, nkv = map(int, heads.split("/"))
            for cache_name in args.caches:
                spec = interop.SparseAttentionSpec(nh, nkv, topk_blocks=shapes.topk,
                                                   kv_cache_dtype=CACHES[cache_name])
                caches = None
                try:
                    pages = pages_per_layer(spec, max(args.layers), args.cache_gb, shapes,
                                            max(args.batches))
                    t0 = time.perf_counter()
                    caches = LayerCaches(spec, max(args.layers), pages, shapes.device)
                    log(f"{heads} {cache_name}: {max(args.layers)} layer caches of {pages} "
                        f"pages in {time.perf_counter() - t0:.1f} s")
                except Exception as e:  # noqa: BLE001 - the other configs still run
                    log(f"{heads} {cache_name}: allocation failed: {e}")
                for num_layers in args.layers:
                    for batch in args.batches:
                        label = f"{heads} {cache_name} {num_layers} layers batch {batch}"
                        t0 = time.perf_counter()
                        try:
                            if caches is None:
                                raise RuntimeError("the layer caches could not be allocated")
                            row = run_config(args, spec, caches, heads, cache_name, num_layers,
                                             batch, rng)
                            log(f"{label}: per layer torch {row['torch_graph_cold_layer_us']:.1f}"
                                f" us, seed {row['seed_graph_cold_layer_us']:.1f} us, JAX "
                                f"{row['jax_cold_layer_us']:.1f} us (warm "
                                f"{row['jax_warm_layer_us']:.1f}), JAX/torch "
                                f"{row['jax_over_torch']:.2f}; first JAX call "
                                f"{row['jax_first_call_s']:.1f} s; max err {row['max_err']:.1e}; "
                                f"{time.perf_counter() - t0:.1f} s")
                        except Exception as e:  # noqa: BLE001 - one failure must not end the run
                            traceback.print_exc()
                            row = dict(heads=heads, cache=cache_name, layers=num_layers,
                                       batch=batch, error=f"{type(e).__name__}: {e}")
                            log(f"{label}: FAILED {row['error'][:300]}")
                        row["config_s"] = time.perf_counter() - t0
                        rows.append(row)
                        _write(f, row)
                        _release()
                del caches
                _release()
    log(f"total {time.perf_counter() - start:.0f} s")
    text = table(header, rows)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    return rows


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _list(text, cast=str):
    return [cast(x) for x in text.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="model_step.jsonl", help="JSON lines; FILE.md: the table")
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--heads", default="64/4,16/1")
    ap.add_argument("--caches", default="bf16,fp8_e4m3", help=", ".join(CACHES))
    ap.add_argument("--cache-gb", type=float, default=36.0,
                    help="all layer caches together (one buffer per layer, shared by both "
                         "frameworks)")
    ap.add_argument("--rep-ms", type=int, default=150, help="do_bench's timed span per graph")
    ap.add_argument("--quick", action="store_true", help="one small config: 8 layers, batch "
                    "64, 64/4, bf16 (each option given still applies)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, Triton interpreter and Pallas interpret mode, tiny shapes: checks "
                         "the script end to end, measures nothing")
    args = ap.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick or args.smoke:
        small = dict(layers="8", batches="64", heads="64/4", caches="bf16") if args.quick else \
            dict(layers="2", batches="3", heads="8/2", caches="bf16")
        for name, value in small.items():
            if f"--{name}" not in given:
                setattr(args, name, value)
    args.layers, args.batches = _list(args.layers, int), _list(args.batches, int)
    args.heads, args.caches = _list(args.heads), _list(args.caches)
    unknown = [c for c in args.caches if c not in CACHES]
    if unknown:
        sys.exit(f"unknown caches {unknown}; expected some of {list(CACHES)}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU (or --smoke)")
    args.shapes = Shapes(args.smoke)
    rows = run(args)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
