"""Time PyTorch's prefill "auto" rule against every forced path and against candidate rules.

    python benchmarks/auto_rule.py --out DIR                  # GPU: 16 rows, about 2-3 min
    python benchmarks/auto_rule.py --match '^64/4' --out A    # a subset of the rows, then
    python benchmarks/auto_rule.py --merge A/auto_rule.json B/auto_rule.json --out DIR
    python benchmarks/auto_rule.py --smoke --out DIR          # CPU: one tiny row, interpreted

Rows: heads (64/4, 16/1) x cache (bf16, fp8_e4m3) x shape (16k, 64k; --shapes adds 4x2k+8k)
x selection (random, rho0.87); one selection per (heads, shape, selection) serves both caches.
Each row checks every call against the token kernel on sampled rows (outputs poisoned with
NaN), then times forced token / union / k2q and "auto" under the committed rule (the one
`torch_sparse.dispatch.PREFILL_RULE` holds) and each of `candidates` (swapped in as
PREFILL_RULE), cold L2, plans included; and the union plan alone (`plan_union`).

How to pick: a rule passes when, on every row, it is at least 0.97x the fastest forced path and
at least 0.98x the token kernel (noise). The summary prints each rule's worst ratios and picks
the passing rule with the best worst ratio to the fastest path (else the best worst ratio
overall); switch `PREFILL_RULE` in torch_sparse/dispatch.py to it.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SMOKE, Case, sample, torch_cold_ms  # noqa: E402  (sets the environment)

import numpy as np  # noqa: E402

import interop  # noqa: E402
from interop.testing import relative_error  # noqa: E402
from interop.tiling import UNION_MIN_TOKENS, PrefillThresholds  # noqa: E402

SHAPES = {"16k": ([16384], [16384]), "64k": ([65536], [65536]),
          "4x2k+8k": ([2048] * 4, [10240] * 4)}
SMOKE_SHAPE = ([12, 12], [148, 148])  # CPU: two short prefills, top-4
SELECTIONS = {"random": None, "rho0.87": 0.87}
FORCED = ("token", "union", "k2q")


def candidates(committed: PrefillThresholds) -> dict:
    """Rules to time beside the committed one: the H100 rule, and variations on the committed
    rule (a candidate equal to it is left out)."""
    rules = {
        # Leftover tiles to k2q from 32k tokens, FP8 caches on the token kernel.
        "h100": PrefillThresholds(union_min_tokens=UNION_MIN_TOKENS, union_share=0.375,
                                  fp8_union_share=None, k2q_min_tokens=32768),
        # A smaller / larger union share (16/1 16k random; 64k rho0.87).
        "share 0.3": dataclasses.replace(committed, union_share=0.3, fp8_union_share=0.3),
        "share 0.5": dataclasses.replace(committed, union_share=0.5, fp8_union_share=0.5),
        # FP8 with a smaller share than bf16 (if the FP8 union kernel's raw rate is lower).
        "fp8 share 0.25": dataclasses.replace(committed, fp8_union_share=0.25),
        # Leftover tiles to k2q from 32k tokens (64k random, where forced k2q is fastest).
        "rest k2q from 32k": dataclasses.replace(committed, k2q_min_tokens=32768),
    }
    return {name: rule for name, rule in rules.items() if rule != committed}


PASS_BEST, PASS_TOKEN = 0.97, 0.98
ERR_LIMIT = 1e-2


@contextlib.contextmanager
def prefill_rule(rule):
    """torch_sparse.dispatch.PREFILL_RULE = rule inside the block."""
    import torch_sparse.dispatch as dispatch
    old = dispatch.PREFILL_RULE
    dispatch.PREFILL_RULE = rule
    try:
        yield
    finally:
        dispatch.PREFILL_RULE = old


def time_row(heads, cache, shape, sel, rules, topk, rng, rep_ms):
    """{"ms": {call: ms}, "plan_ms": the union plan alone, "tflops": {call: useful TFLOP/s}}
    of one row, and the case's selection for reuse."""
    from torch_sparse.union import plan_union, tile_tokens
    nh, nkv = map(int, heads.split("/"))
    spec = interop.SparseAttentionSpec(num_heads=nh, num_kv_heads=nkv,
                                       topk_blocks=4 if SMOKE else 16, kv_cache_dtype=cache)
    ql, sl = SMOKE_SHAPE if SMOKE else SHAPES[shape]
    case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1, rho=SELECTIONS[sel],
                scales=(0.75, 1.25) if spec.is_fp8 else None, topk=topk)
    idx = case.sample_idx(256)
    case.out.fill_(float("nan"))
    base = sample(case.torch_fn("token")(), idx)
    calls = {p: (None, p) for p in FORCED}
    calls.update({f"auto[{name}]": (r, "auto") for name, r in rules.items()})
    ms = {}
    for name, (r, algo) in calls.items():
        with prefill_rule(r) if r is not None else contextlib.nullcontext():
            fn = case.torch_fn(algo)
            case.out.fill_(float("nan"))
            err = relative_error(sample(fn(), idx), base)
            if not err <= ERR_LIMIT:
                raise AssertionError(f"{heads} {cache} {shape} {sel} {name}: error {err:.2e} "
                                     f"against the token kernel (limit {ERR_LIMIT})")
            ms[name] = torch_cold_ms(fn, rep_ms=rep_ms)
    md = case.t_md
    plan_ms = torch_cold_ms(lambda: plan_union(
        case.topk, md.block_table, md.token_to_req, md.token_positions, case.cache.shape[0],
        tile_tokens=tile_tokens(nh // nkv)), rep_ms=rep_ms)
    return {"ms": ms, "plan_ms": plan_ms,
            "tflops": {k: case.flops / (v * 1e-3) / 1e12 for k, v in ms.items()}}, case.topk_np


def summary(results, rules):
    """Lines: each rule's worst ratio to the fastest forced path and to the token kernel, and
    the pick."""
    lines, scores = [], {}
    for name in rules:
        key = f"auto[{name}]"
        best = [min(r["ms"][p] for p in FORCED) / r["ms"][key] for r in results]
        tok = [r["ms"]["token"] / r["ms"][key] for r in results]
        worst = min(range(len(best)), key=best.__getitem__)
        w = results[worst]
        passed = min(best) >= PASS_BEST and min(tok) >= PASS_TOKEN
        scores[name] = (passed, min(best))
        lines.append(f"  {name:22s} best-path ratio min {min(best):.3f} (mean "
                     f"{np.mean(best):.3f}; worst row {w['heads']} {w['cache']} {w['shape']} "
                     f"{w['selection']}), token ratio min {min(tok):.3f}"
                     f"{'  PASS' if passed else ''}")
    pick = max(scores, key=scores.get)
    lines.append(f"pick: {pick} ({'passes' if scores[pick][0] else 'no rule passes; best worst'}"
                 f" ratio {scores[pick][1]:.3f})")
    return lines


def write(out, rules, results):
    """auto_rule.json: the rules' fields and the rows measured so far."""
    with open(os.path.join(out, "auto_rule.json"), "w") as f:
        json.dump({"rules": rules, "rows": results}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU: one tiny row (harness reads it)")
    ap.add_argument("--shapes", default="16k,64k", help=f"of {list(SHAPES)}")
    ap.add_argument("--match", default=None, help="regex on 'heads cache shape selection'")
    ap.add_argument("--rules", default=None, help="comma-separated rule names (default: all)")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--merge", nargs="+", default=None,
                    help="auto_rule.json files of earlier runs: their rows, one summary")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        runs = [json.load(open(path)) for path in args.merge]
        names = [name for name in runs[0]["rules"] if all(name in r["rules"] for r in runs)]
        results = [row for r in runs for row in r["rows"]]
        write(args.out, runs[0]["rules"], results)
        print("\n".join(summary(results, names)))
        return
    import torch_sparse.dispatch as dispatch
    rows = [(h, c, s, sel) for h in ("64/4", "16/1") for s in args.shapes.split(",")
            for sel in SELECTIONS for c in ("bfloat16", "fp8_e4m3")]
    if SMOKE:
        rows = [("16/1", c, "smoke", "rho0.87") for c in ("bfloat16", "fp8_e4m3")]
    if args.match:
        rows = [r for r in rows if re.search(args.match, " ".join(r))]
    rules = {"committed": dispatch.PREFILL_RULE, **candidates(dispatch.PREFILL_RULE)}
    if args.rules:
        rules = {k: v for k, v in rules.items() if k in args.rules.split(",")}
    if SMOKE:  # the tiny row plans too
        rules = {k: dataclasses.replace(v, union_min_tokens=0) for k, v in rules.items()}
    results, topks = [], {}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for heads, cache, shape, sel in rows:
        row, topks[heads, shape, sel] = time_row(heads, cache, shape, sel, rules,
                                                 topks.get((heads, shape, sel)), rng,
                                                 args.rep_ms)
        row.update(heads=heads, cache=cache, shape=shape, selection=sel)
        results.append(row)
        print(f"{heads} {cache} {shape} {sel} [{time.perf_counter() - start:.0f} s]: "
              + ", ".join(f"{k} {v:.0f}" for k, v in row["tflops"].items())
              + f"; plan {row['plan_ms']:.3f} ms of union's {row['ms']['union']:.3f}",
              flush=True)
        write(args.out, {k: dataclasses.asdict(v) for k, v in rules.items()}, results)
    print("\nuseful TFLOP/s above; per rule, worst ratios over the rows "
          f"(pass: >= {PASS_BEST} of the fastest forced path, >= {PASS_TOKEN} of token):")
    print("\n".join(summary(results, rules)))


if __name__ == "__main__":
    main()
