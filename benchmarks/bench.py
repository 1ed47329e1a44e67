"""Both front ends against the measured ceilings and the peer (vLLM's Triton kernels), one run.

    python benchmarks/bench.py --rows check --out bench_out      # the GPU check (under 5 min)
    python benchmarks/bench.py --rows all --list                 # the rows, without running
    python benchmarks/bench.py --rows all --match 'prefill 64/4' --out bench_out/p1
    python benchmarks/bench.py --merge bench_out/p1 bench_out/p2 --out bench_out   # one table
    python benchmarks/bench.py --rows smoke --out /tmp/smoke     # CPU, interpreters, tiny

A row is one batch (`harness.Case`) timed on every path; benchmarks/README.md says what each
row and column means. Decode rows: one query token (L2: two, speculative) per request at 32k
tokens; bytes = the K/V bytes of the valid selected blocks. Prefill rows: a prefill batch with
random or correlated selections, every `prefill_algorithm` of both front ends, Mosaic and the
peer; useful FLOPs from the actual selection. Every timed output is first checked on sampled
rows (outputs poisoned with NaN). `harness.py` holds the cases, the timers and the peer.

Writes `bench.json` (every figure and the device), `bench_partial.json` (rewritten after every
figure, so a run cut short keeps what it measured), `bench.md` and `decode_bandwidth.png`.
Exits 1 when a row or path raised (its error is in the tables).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import harness  # first: sets the environment before any kernel import
from harness import (SMOKE, Case, graph_cold_ms, graph_warm_ms, jax_call_ms,  # noqa: E402
                     jax_cold_ms, jax_steady_ms, mosaic_note, peer_decode_fn, peer_prefill_fn,
                     sample, torch_cold_ms)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402
from interop.testing import mean_tile_union, relative_error  # noqa: E402

CACHES = {"bf16": "auto", "fp8_e4m3": "fp8_e4m3"}  # row label -> spec kv_cache_dtype
# name -> (query_lens, seq_lens); every token a prefill token. The last is CPU-sized (smoke).
PREFILL_SHAPES = {"16k": ([16384], [16384]), "64k": ([65536], [65536]),
                  "4x2k+8k": ([2048] * 4, [10240] * 4), "2x12+136": ([12] * 2, [148] * 2)}
SELECTIONS = {"random": None, "rho0.87": 0.87}  # make_topk's rho
FP8_SCALES = (0.75, 1.25)  # scalar k_scale, v_scale of the FP8 prefill rows
PREFILL_PATHS = tuple(f"{fw}:{alg}" for fw in ("torch", "jax")
                      for alg in ("token", "union", "k2q", "auto")) + ("mosaic", "peer")
ERR_LIMIT = 1e-2


def log(msg):
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str                  # "decode" or "prefill"
    heads: str                 # query / KV heads, "64/4"
    cache: str                 # a CACHES label
    batch: int = 0             # decode: requests
    query_len: int = 1         # decode: tokens per request (2: one speculative token)
    context: int = 32768       # decode: tokens per request, the new ones included
    shape: str = ""            # prefill: a PREFILL_SHAPES name
    selection: str = "random"  # a SELECTIONS name
    topk: int = 16

    @property
    def name(self):
        if self.kind == "decode":
            return f"decode {self.heads} {self.cache} L{self.query_len} b{self.batch}"
        return f"prefill {self.heads} {self.cache} {self.shape} {self.selection}"

    def spec(self):
        nh, nkv = map(int, self.heads.split("/"))
        return interop.SparseAttentionSpec(nh, nkv, topk_blocks=self.topk,
                                           kv_cache_dtype=CACHES[self.cache])


def _decode(heads, caches, qlens, batches, **kw):
    return [Row("decode", h, c, batch=b, query_len=L, **kw)
            for h in heads for c in caches for L in qlens for b in batches]


def _prefill(heads, caches, shapes, selections, **kw):
    return [Row("prefill", h, c, shape=s, selection=sel, **kw)
            for h in heads for c in caches for s in shapes for sel in selections]


HEADS = ("64/4", "16/1")
ROWS = {
    "all": _decode(HEADS, CACHES, (1, 2), (1, 16, 64, 256))
    + _prefill(HEADS, CACHES, ("16k", "64k", "4x2k+8k"), SELECTIONS),
    "quick": _decode(HEADS, CACHES, (1,), (1, 64, 256))
    + _prefill(("64/4",), ("bf16",), ("16k", "4x2k+8k"), SELECTIONS),
    # Decode: launch-bound (batch 1), bandwidth-bound (64, 256), FP8. Prefill: where union wins
    # (rho0.87), where it loses (random), and where "auto" has missed union (64k rho0.87).
    "check": _decode(("64/4",), ("bf16",), (1,), (1, 64))
    + _decode(("16/1",), ("fp8_e4m3",), (1,), (256,))
    + _prefill(("64/4",), ("bf16",), ("16k",), SELECTIONS)
    + _prefill(("64/4",), ("bf16",), ("64k",), ("rho0.87",)),
    # One row per family on CPU: tiny, top-4, under the interpreters.
    "smoke": _decode(("16/1",), ("fp8_e4m3",), (1,), (2,), context=300, topk=4)
    + _prefill(("16/1",), ("bf16",), ("2x12+136",), ("rho0.87",), topk=4),
}


# --- decode --------------------------------------------------------------------------------------

def decode_row(row, rng):
    """Every decode figure of one batch: the public calls (PyTorch eager and graph, JAX call and
    steady state, Mosaic), then the seed's decode call and the peer's as CUDA-graph replays
    with L2 flushed before each (the headline), and the differences between them."""
    L, b = row.query_len, row.batch
    case = Case(row.spec(), [L] * b, [row.context] * b, rng, decode_query_len=L)
    res = dict(bytes=case.kv_bytes, torch_vs_jax_err=case.check(),
               torch_ms=torch_cold_ms(case.torch_fn()),
               torch_graph_ms=graph_warm_ms(case.torch_fn()),
               jax_ms=jax_call_ms(case.jax_fn()), jax_pipelined_ms=jax_steady_ms(case.jax_fn()))
    idx = case.sample_idx(256)
    res.update(mosaic_ms=None, mosaic_pipelined_ms=None, mosaic_vs_pallas_err=None)
    note = mosaic_note()
    if note:
        res["mosaic_note"] = note
    else:
        fn = case.jax_fn(implementation="mosaic")
        res["mosaic_vs_pallas_err"] = relative_error(
            sample(fn(), idx), sample(case.jax_fn(implementation="pallas")(), idx))
        res.update(mosaic_ms=jax_call_ms(fn), mosaic_pipelined_ms=jax_steady_ms(fn))
    seed_out = torch.empty_like(case.q)
    res["torch_graph_cold_ms"] = graph_cold_ms(case.seed_decode_fn(L, seed_out))
    res.update(peer_graph_cold_ms=None, peer_vs_torch_err=None)
    call, note = peer_decode_fn(case, L)
    if note:
        res["peer_note"] = note
    else:
        res["peer_graph_cold_ms"] = graph_cold_ms(call)
        res["peer_vs_torch_err"] = relative_error(sample(call(), idx), sample(seed_out, idx))
    for k in ("torch", "torch_graph", "jax", "jax_pipelined", "torch_graph_cold",
              "peer_graph_cold", "mosaic", "mosaic_pipelined"):
        t = res[f"{k}_ms"]
        res[f"{k}_tbs"] = None if t is None else case.kv_bytes / (t * 1e-3) / 1e12
    log(f"  torch graph cold {_us_tbs(res, 'torch_graph_cold')}, peer "
        f"{_us_tbs(res, 'peer_graph_cold')}; jax steady {_us_tbs(res, 'jax_pipelined')}, mosaic "
        f"{_us_tbs(res, 'mosaic_pipelined')}; jax vs torch {res['torch_vs_jax_err']:.1e}")
    return res


# --- prefill -------------------------------------------------------------------------------------

def path_call(case, path):
    """(call, None) for one prefill path, call() returning its full output; (None, why not)."""
    if path == "peer":
        return peer_prefill_fn(case)
    if path == "mosaic":
        note = mosaic_note()
        return (None, note) if note else (case.jax_fn(implementation="mosaic"), None)
    fw, alg = path.split(":")
    return (case.torch_fn(alg) if fw == "torch" else case.jax_fn(prefill_algorithm=alg)), None


def prefill_row(args, row, rng, res, save):
    """Check then time every selected path on one prefill batch; fills res, saving after
    every figure."""
    ql, sl = PREFILL_SHAPES[row.shape]
    spec = row.spec()
    case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1, rho=SELECTIONS[row.selection],
                scales=FP8_SCALES if spec.is_fp8 else None)
    idx = case.sample_idx(args.samples)
    res.update(tokens=case.md.num_tokens, prefill_context=sl[0] - ql[0], flops=case.flops,
               union8=mean_tile_union(case.topk_np, case.md), sampled_rows=len(idx), paths={})
    ref = case.reference(idx)
    case.out.fill_(float("nan"))  # an unwritten row shows as inf below
    base = sample(case.torch_fn("token")(), idx)  # the per-token PyTorch kernel: the baseline
    res["token_vs_f64_err"] = relative_error(base, ref)
    for path in args.paths:
        p = res["paths"][path] = {}
        try:
            call, note = path_call(case, path)
            if call is None:
                p["note"] = note
            else:
                case.out.fill_(float("nan"))
                t0 = time.perf_counter()
                got = sample(call(), idx)
                p.update(err_vs_token=relative_error(got, base),
                         err_vs_f64=relative_error(got, ref))
                timer = jax_cold_ms if path.startswith(("jax", "mosaic")) else torch_cold_ms
                # On CPU the checked call's host time stands in (an interpreted call is slow).
                p["ms"] = ((time.perf_counter() - t0) * 1e3 if SMOKE
                           else timer(call, rep_ms=args.rep_ms))
                p["tflops"] = case.flops / (p["ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            p["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        save()
        log(f"  {path}: " + (f"{p['ms']:.3f} ms, {p['tflops']:.0f} TFLOP/s, err vs token "
                             f"{p['err_vs_token']:.1e}" if "tflops" in p else
                             p.get("note") or p["error"]))
    ms = {path: p["ms"] for path, p in res["paths"].items() if "tflops" in p}
    for path, p in res["paths"].items():  # > 1: faster, both from this run
        if path in ms:
            token = {"peer": "torch", "mosaic": "jax"}.get(path, path.split(":")[0]) + ":token"
            p["speedup_vs_token"] = ms[token] / ms[path] if token in ms else None
            p["speedup_vs_peer"] = ms["peer"] / ms[path] if "peer" in ms else None


# --- the run -------------------------------------------------------------------------------------

def run(args, rows):
    import jax
    import triton
    rng = np.random.default_rng(0)
    device = "CPU, interpreters (smoke)" if SMOKE else torch.cuda.get_device_name()
    ceil = None if SMOKE else harness.ceilings()
    result = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  jax=jax.__version__, ceilings=ceil, vllm=harness.vllm_version(), rows=[])
    log(f"device: {device}; torch {torch.__version__}, triton {triton.__version__}, "
        f"jax {jax.__version__}; ceilings {ceil}")

    def save():
        with open(os.path.join(args.out, "bench_partial.json"), "w") as f:
            json.dump(dict(result, partial=True), f, indent=1)

    start = time.perf_counter()
    for row in rows:
        log(f"{row.name}:")
        res = dict(dataclasses.asdict(row), name=row.name)
        result["rows"].append(res)
        t0 = time.perf_counter()
        try:
            if row.kind == "decode":
                res.update(decode_row(row, rng))
            else:
                prefill_row(args, row, rng, res, save)
        except Exception as e:  # noqa: BLE001 - one failing row must not end the run
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  FAILED {res['error']}")
        res["row_s"] = time.perf_counter() - t0
        save()
        if not SMOKE:
            torch.cuda.empty_cache()
    log(f"total {time.perf_counter() - start:.0f} s")
    return result


def failures(result):
    """The rows and paths that raised (not those that cannot run here: those hold a note)."""
    return [r["name"] + (f" {p}" if p else "")
            for r in result["rows"]
            for p in ([None] if "error" in r else [p for p, v in r.get("paths", {}).items()
                                                   if "error" in v])]


# --- tables --------------------------------------------------------------------------------------

def table(result, compact=False):
    c = result["ceilings"]
    ceil_text = ("no ceilings (CPU)" if c is None else f"measured ceilings: copy "
                 f"{c['copy_tbs']:.2f} TB/s, bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s")
    lines = [f"Device: {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"jax {result['jax']}); {ceil_text}; vllm: {result['vllm'] or 'not importable'}"]
    rows = result["rows"]
    lines += [f"FAILED {r['name']}: {r['error']}" for r in rows if "error" in r]
    decode = [r for r in rows if r["kind"] == "decode" and "error" not in r]
    if decode:
        lines += ["", *decode_table(decode, c, compact)]
    prefill = [r for r in rows if r["kind"] == "prefill" and "paths" in r]
    if prefill:
        lines += ["", *prefill_tables(prefill, c and c["matmul_bf16_tflops"], compact)]
    return "\n".join(lines)


def decode_table(rows, ceil, compact):
    lines = ["Decode. Cold graph: CUDA-graph replay of the seed's decode call (peer: its own), "
             "L2 flushed before each replay: the figure a model sees. x peer: speed over the "
             "peer in this run; peer err: the peer against ours on sampled tokens. JAX steady: "
             "calls queued back to back (warm L2)."
             + ("" if compact else " Torch eager: CUDA events, L2 flushed; torch graph: replays "
                "back to back (warm L2); jax call: host time of one call."), ""]
    cols = ["heads", "cache", "L", "batch", "torch cold graph (TB/s)", "peer cold graph (TB/s)",
            "x peer", "peer err", "jax steady (TB/s)", "mosaic steady (TB/s)"]
    if not compact:
        cols += ["torch eager", "torch warm graph (of copy)", "jax call",
                 "jax/torch speed: call/eager, steady/warm graph", "jax vs torch err",
                 "mosaic call", "mosaic/pallas steady", "mosaic err"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["heads"], r["cache"], r["query_len"], r["batch"],
                 _us_tbs(r, "torch_graph_cold"), _us_tbs(r, "peer_graph_cold"),
                 _fmt(_speed(r["peer_graph_cold_ms"], r["torch_graph_cold_ms"])),
                 _fmt(r["peer_vs_torch_err"], ".1e"), _us_tbs(r, "jax_pipelined"),
                 _us_tbs(r, "mosaic_pipelined")]
        if not compact:
            of = "" if ceil is None else f", {r['torch_graph_tbs'] / ceil['copy_tbs']:.0%}"
            cells += [_us(r["torch_ms"]), f"{_us_tbs(r, 'torch_graph')}{of}", _us(r["jax_ms"]),
                      f"{_speed(r['torch_ms'], r['jax_ms']):.2f}, "
                      f"{_speed(r['torch_graph_ms'], r['jax_pipelined_ms']):.2f}",
                      _fmt(r["torch_vs_jax_err"], ".1e"), _us(r["mosaic_ms"]),
                      _fmt(_speed(r["jax_pipelined_ms"], r["mosaic_pipelined_ms"])),
                      _fmt(r["mosaic_vs_pallas_err"], ".1e")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _case_label(r):
    return f"{r['heads']} | {r['cache']} | {r['shape']} | {r['selection']} | {r['union8']:.1f}"


def prefill_tables(rows, matmul_tflops, compact):
    """A summary (useful TFLOP/s of every path per row) and, unless compact, one line per
    (row, path)."""
    paths = [p for p in PREFILL_PATHS if any(p in r["paths"] for r in rows)]
    lines = ["Prefill, useful TFLOP/s (cold L2; '-': not run" + ("" if compact else ", see the "
             "detail table") + "). union8: mean distinct blocks per 8-token tile and KV head.", "",
             "| heads | cache | shape | selection | union8 | " + " | ".join(paths) + " |",
             "|---|---|---|---|---|" + "---|" * len(paths)]
    for r in rows:
        cells = [f"{r['paths'][p]['tflops']:.0f}" if "tflops" in r["paths"].get(p, {}) else "-"
                 for p in paths]
        lines.append(f"| {_case_label(r)} | " + " | ".join(cells) + " |")
    if compact:
        return lines
    lines += ["", "Detail. x token: speed over the same framework's per-token path (the peer: "
              "over PyTorch's); x peer: over the peer's prefill kernel; both from this run. "
              "err: relative error on the sampled rows against the per-token PyTorch kernel "
              f"(its own line: against the float64 reference); '!' marks err > {ERR_LIMIT}.", "",
              "| heads | cache | shape | selection | union8 | path | time | TFLOP/s (of matmul) "
              "| x token | x peer | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in paths:
            res = r["paths"].get(p)
            if res is None:
                continue
            if "tflops" not in res:
                why = res.get("note") or f"FAILED {res.get('error', '')}"
                lines.append(f"| {_case_label(r)} | {p} | - | {why} | | | |")
                continue
            of = "" if matmul_tflops is None else f", {res['tflops'] / matmul_tflops:.0%}"
            err = r["token_vs_f64_err"] if p == "torch:token" else res["err_vs_token"]
            lines.append(
                f"| {_case_label(r)} | {p} | {res['ms']:.3f} ms | {res['tflops']:.0f}{of} | "
                f"{_fmt(res.get('speedup_vs_token'))} | {_fmt(res.get('speedup_vs_peer'))} | "
                f"{err:.1e}{' !' if err > ERR_LIMIT else ''} |")
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
        if r["kind"] == "decode" and r["query_len"] == 1 and "error" not in r:
            for name, key in (("torch cold graph", "torch_graph_cold_tbs"),
                              ("peer cold graph", "peer_graph_cold_tbs"),
                              ("jax steady", "jax_pipelined_tbs"),
                              ("mosaic steady", "mosaic_pipelined_tbs")):
                if r.get(key) is not None:
                    groups.setdefault((r["heads"], r["cache"], name), []).append(
                        (r["batch"], r[key]))
    if not groups or result["ceilings"] is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (heads, cache, name), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle={"jax": "-", "mosaic": ":", "peer": "-."}.get(name.split()[0], "--"),
                label=f"{name} {heads} {cache}")
    ax.axhline(result["ceilings"]["copy_tbs"], color="k", linewidth=0.8, label="copy ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (requests, 32k tokens each)")
    ax.set_ylabel("K/V bytes read / time (TB/s)")
    ax.set_title(f"Decode bandwidth, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_result(path):
    """A result of this script: a folder's bench.json (else bench_partial.json), or a file."""
    if os.path.isdir(path):
        full = os.path.join(path, "bench.json")
        path = full if os.path.exists(full) else os.path.join(path, "bench_partial.json")
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", choices=ROWS, default="all",
                    help="all: every row (over an hour: split it with --match); quick: fewer; "
                         "check: the GPU subset (under 5 min); smoke: tiny rows on CPU")
    ap.add_argument("--match", help="keep the rows whose name matches this regular expression")
    ap.add_argument("--paths", default=",".join(PREFILL_PATHS),
                    help="prefill paths (default: all): " + ", ".join(PREFILL_PATHS))
    ap.add_argument("--list", action="store_true", help="print the selected rows and exit")
    ap.add_argument("--compact", action="store_true",
                    help="headline columns only (decode: cold graphs; prefill: the summary)")
    ap.add_argument("--out", default="bench_out", help="folder for the results")
    ap.add_argument("--samples", type=int, default=64,
                    help="rows of each prefill output checked against the token path")
    ap.add_argument("--rep-ms", type=int, default=300, help="timed span of each prefill figure")
    ap.add_argument("--merge", nargs="+", metavar="RESULT",
                    help="only write the tables of these results (folders or json files) together")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS[args.rows] if not args.match or re.search(args.match, r.name)]
    args.paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in args.paths if p not in PREFILL_PATHS]
    if unknown:
        sys.exit(f"unknown paths {unknown}; expected some of {list(PREFILL_PATHS)}")
    if args.list:
        print("\n".join(r.name for r in rows) + f"\n{len(rows)} rows")
        return 0
    if args.merge:
        parts = [load_result(p) for p in args.merge]
        result = dict(parts[0], rows=[r for part in parts for r in part["rows"]])
        result.pop("partial", None)
    else:
        if (args.rows == "smoke") != SMOKE:
            sys.exit("--rows smoke runs on CPU, every other row set on a CUDA GPU")
        if not SMOKE and not torch.cuda.is_available():
            sys.exit("the benchmark needs a CUDA GPU (or --rows smoke)")
        os.makedirs(args.out, exist_ok=True)
        result = run(args, rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = table(result, args.compact)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(text + "\n")
    plot(result, os.path.join(args.out, "decode_bandwidth.png"))
    print(text)
    failed = failures(result)
    if failed:
        log("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
