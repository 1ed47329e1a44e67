"""The lightning indexer (scores + top-k) on the GPU: both front ends beside the peer.

    python benchmarks/indexer_bench.py --out bench_out/indexer     # H200: about 6 min
    python benchmarks/indexer_bench.py --match 'decode'            # a subset of the rows
    python benchmarks/indexer_bench.py --smoke --out /tmp/idx      # CPU, interpreters, tiny

Rows (M3's indexer: 128-dim bf16 index queries and keys, top-16, init 0, local 1; 4 index heads,
and 1 as at tensor parallel 4): prefill of 16k and 64k tokens (one request, no context), and
decode batches of 1, 16, 64 and 256 requests of one token at 32k tokens of context.
Paths: "torch" (`torch_sparse.index_topk`, eager; decode also as a CUDA-graph replay,
"torch:graph"), "jax:pallas" and "jax:xla" (`jax_sparse.index_topk`; XLA on decode rows only:
it gathers every visible page per token), and "peer" (vLLM 0.33's Triton indexer from .peer:
its score + top-k kernels for prefill, its split decode kernels for decode, as a CUDA-graph
replay), each timed with the L2 flushed before every call (`harness`: do_bench for PyTorch
and the peer, `jax_cold_ms` for JAX, which includes JAX's host dispatch).
Check: before timing, each path's rows of up to --samples tokens are compared with the
float64 reference (`interop.reference_index_topk`) as sets: `bad` counts rows that differ by
more than a near-tie (the two blocks' reference scores within --tol), `exact` the share of
rows with the reference's very order (the peer orders forced blocks and ties its own way).
Figures: prefill TFLOP/s counts 2 * head * index heads per (token, visible key); decode TB/s
counts the index-key bytes of the visible blocks (the cache read once).
Writes indexer_bench.json and indexer_bench.md under --out; exits 1 if a path raised or
checked bad.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import types

import harness  # first: sets the environment before any kernel import
from harness import SMOKE, graph_cold_ms, jax_cold_ms, torch_cold_ms  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402
from interop.indexer import IndexerSpec  # noqa: E402
from interop.testing import random_block_table  # noqa: E402

BS = 128
PREFILL = {"16k": 16384, "64k": 65536} if not SMOKE else {"200": 200}
DECODE_BATCHES = (1, 16, 64, 256) if not SMOKE else (2,)
CONTEXT = 32768 if not SMOKE else 700
HEADS = (4, 1)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rows():
    out = [("prefill", h, n) for n in PREFILL for h in HEADS]
    out += [("decode", h, b) for b in DECODE_BATCHES for h in HEADS]
    return out


def row_name(kind, heads, size):
    return f"prefill {size} h{heads}" if kind == "prefill" else f"decode b{size} h{heads}"


class IndexCase:
    """One batch on the device; both front ends and the peer read the same buffers."""

    def __init__(self, kind, heads, size, rng):
        import jax
        if kind == "prefill":
            query_lens = seq_lens = [PREFILL[size]]
        else:
            query_lens, seq_lens = [1] * size, [CONTEXT] * size
        self.kind, self.ispec = kind, IndexerSpec(heads)
        table, num_blocks = random_block_table(seq_lens, rng, spare_blocks=1)
        self.md = interop.build_metadata(query_lens, seq_lens, table, num_blocks=num_blocks)
        dev = torch.device(harness.DEVICE)
        self.q = torch.randn(self.md.num_tokens, heads, 128, device=dev, dtype=torch.bfloat16)
        self.cache = torch.randn(num_blocks, BS, 128, device=dev, dtype=torch.bfloat16)
        self.out = torch.empty(self.ispec.topk_shape(self.md.num_tokens), dtype=torch.int32,
                               device=dev)
        self.t_md = interop.to_torch(self.md, dev)
        jdev = jax.devices("gpu" if dev.type == "cuda" else "cpu")[0]
        self.j_q, self.j_cache = interop.to_jax(self.q), interop.to_jax(self.cache)
        self.j_md = interop.to_jax(self.md, jdev)
        pos = self.md.token_positions.astype(np.int64)
        nvis = pos // BS + 1
        self.flops = 2 * 128 * heads * int((pos + 1).sum())
        self.bytes = int(nvis.sum()) * BS * 128 * 2 if kind == "decode" else None

    def torch_fn(self):
        import torch_sparse
        return lambda: torch_sparse.index_topk(self.ispec, self.q, self.cache, self.t_md,
                                               out=self.out)

    def jax_fn(self, implementation):
        import jax_sparse
        return lambda: jax_sparse.index_topk(self.ispec, self.j_q, self.j_cache, self.j_md,
                                             implementation=implementation)

    def peer_fn(self):
        """(call, None), or (None, why not): the peer's indexer on this batch."""
        try:
            from vllm.models.minimax_m3.common.ops import index_topk as peer
        except ImportError:
            return None, "peer not importable (.peer; ../shared/tools/peer-setup.sh)"
        if SMOKE:
            return None, "the peer's kernels are not run under the interpreter"
        md, h, k = self.md, self.ispec.num_index_heads, self.ispec.topk_blocks
        dev = self.q.device
        i32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int32, device=dev)  # noqa: E731
        out = torch.empty_like(self.out)
        if self.kind == "decode":
            table, seq = i32(md.block_table), i32(md.seq_lens)
            return (lambda: peer.minimax_m3_index_decode(
                self.q, self.cache, table, seq, md.max_seq_len, k, 0, 1, h, 1, 1, out=out)), None
        pf = md.prefill
        cu, seq, ctx, table = (i32(x) for x in (pf.cu_seqlens_q, pf.seq_lens, pf.context_lens,
                                                pf.block_table))

        def call():
            score = peer.minimax_m3_index_score(self.q, self.cache, table, cu, seq, ctx,
                                                pf.max_query_len, pf.max_seq_len, h)
            return peer.minimax_m3_index_topk(score, cu, ctx, pf.max_query_len, k, 0, 1,
                                              out=out)
        return call, None

    def check(self, out, samples, tol):
        """(rows checked, rows beyond a near-tie from the reference's set, rows in its exact
        order) on up to `samples` tokens spread over the batch."""
        n = self.md.num_tokens
        idx = np.unique(np.linspace(0, n - 1, min(samples, n)).round().astype(np.int64))
        got = (out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))[:, idx]
        sub = types.SimpleNamespace(token_positions=self.md.token_positions[idx],
                                    token_to_req=self.md.token_to_req[idx],
                                    block_table=self.md.block_table)
        ref, scores = interop.reference_index_topk(
            self.ispec, self.q[torch.from_numpy(idx).to(self.q.device)], self.cache, sub)
        exact = (got == ref).all(-1)
        bad = 0
        for h, t in zip(*np.nonzero(~exact)):
            a, b = np.sort(got[h, t]), np.sort(ref[h, t])
            if (a == b).all():
                continue
            extra, missing = np.setdiff1d(a, b), np.setdiff1d(b, a)
            if (extra < 0).any() or (missing < 0).any():
                bad += 1
                continue
            # A near-tie: the weakest kept block of the reference is within tol of the best
            # one it left out.
            gap = scores[h, t, missing].min() - scores[h, t, extra].max()
            bad += int(not gap <= tol)
        return int(exact.size), bad, float(exact.mean())


def run_row(kind, heads, size, rng, args):
    case = IndexCase(kind, heads, size, rng)
    paths = {"torch": case.torch_fn(), "jax:pallas": case.jax_fn("pallas")}
    if kind == "decode":
        paths["jax:xla"] = case.jax_fn("xla")
    peer, note = case.peer_fn()
    res = dict(kind=kind, heads=heads, size=size, name=row_name(kind, heads, size), paths={})
    if note:
        res["paths"]["peer"] = dict(note=note)
    else:
        paths["peer"] = peer
    for path, fn in paths.items():
        entry = res["paths"].setdefault(path, {})
        try:
            case.out.fill_(-7)
            rows_checked, bad, exact = case.check(fn(), args.samples, args.tol)
            entry.update(rows=rows_checked, bad=bad, exact=exact)
            timer = jax_cold_ms if path.startswith("jax") else (
                graph_cold_ms if path == "peer" else torch_cold_ms)
            entry["ms"] = timer(fn)
            if path == "torch" and kind == "decode":
                res["paths"]["torch:graph"] = dict(ms=graph_cold_ms(fn))
        except Exception as e:  # noqa: BLE001 - one failing path must not end the run
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for entry in res["paths"].values():
        if entry.get("ms"):
            entry["tflops"] = case.flops / (entry["ms"] * 1e-3) / 1e12
            if case.bytes:
                entry["tbs"] = case.bytes / (entry["ms"] * 1e-3) / 1e12
    return res


def table(result):
    lines = [f"Indexer on {result['device']} (torch {result['torch']}, triton "
             f"{result['triton']}, jax {result['jax']}); cold L2, median ms.", "",
             "| row | path | ms | TFLOP/s | TB/s (decode) | rows bad / checked | exact order |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for path, e in r["paths"].items():
            if "ms" not in e:
                why = e.get("error") or e.get("note", "")
                lines.append(f"| {r['name']} | {path} | {why} | | | | |")
                continue
            tbs = f"{e['tbs']:.2f}" if e.get("tbs") else ""
            chk = f"{e['bad']} / {e['rows']}" if "rows" in e else ""
            exact = f"{e['exact']:.0%}" if "exact" in e else ""
            lines.append(f"| {r['name']} | {path} | {e['ms']:.3f} | {e['tflops']:.1f} | {tbs} | "
                         f"{chk} | {exact} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/indexer", help="folder for the results")
    ap.add_argument("--match", help="keep the rows whose name matches this regular expression")
    ap.add_argument("--samples", type=int, default=48, help="tokens checked per path")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="a near-tie: reference scores this close (scores are ~N(0, 11^2))")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreters, tiny shapes")
    args = ap.parse_args(argv)
    import jax
    import triton
    os.makedirs(args.out, exist_ok=True)
    result = dict(device="CPU, interpreters (smoke)" if SMOKE else torch.cuda.get_device_name(),
                  torch=torch.__version__, triton=triton.__version__, jax=jax.__version__,
                  rows=[])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for kind, heads, size in rows():
        name = row_name(kind, heads, size)
        if args.match and not re.search(args.match, name):
            continue
        t0 = time.perf_counter()
        res = run_row(kind, heads, size, rng, args)
        res["row_s"] = time.perf_counter() - t0
        result["rows"].append(res)
        log(f"{name} ({res['row_s']:.0f} s): " + ", ".join(
            f"{p} {e['ms']:.3f} ms ({e.get('bad')} bad)" if "ms" in e else
            f"{p} {e.get('error') or e.get('note')}" for p, e in res["paths"].items()))
        with open(os.path.join(args.out, "indexer_bench.json"), "w") as f:
            json.dump(result, f, indent=1)
        if not SMOKE:
            torch.cuda.empty_cache()
    log(f"total {time.perf_counter() - start:.0f} s")
    md = table(result)
    with open(os.path.join(args.out, "indexer_bench.md"), "w") as f:
        f.write(md)
    print(md)
    failed = [f"{r['name']} {p}" for r in result["rows"] for p, e in r["paths"].items()
              if "error" in e or e.get("bad")]
    if failed:
        log(f"failed or checked bad: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
