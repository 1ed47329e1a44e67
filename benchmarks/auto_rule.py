"""Measure PyTorch's prefill "auto" rule against every forced path, and candidate rules.

    python benchmarks/auto_rule.py --out DIR                 # GPU: the grid below
    python benchmarks/auto_rule.py --quick --out DIR         # 64k rho0.87 and random only

For each row (heads x cache x shape x selection) it checks the forced paths against the token
kernel, then times token / union / k2q / auto and each candidate rule (an override of
`torch_sparse.dispatch`'s thresholds: union share, k2q threshold, FP8 admission), cold L2.
A rule is good when it is within 3% of the fastest forced path on every row and never below
the token kernel beyond noise; the table prints each rule's worst ratio to the best path.
"""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Case, sample, torch_cold_ms  # noqa: E402  (sets the environment first)

import numpy as np  # noqa: E402

import interop  # noqa: E402
from interop.testing import relative_error  # noqa: E402

SHAPES = {"16k": ([16384], [16384]), "64k": ([65536], [65536]),
          "4x2k+8k": ([2048] * 4, [10240] * 4)}
SELECTIONS = {"random": None, "rho0.87": 0.87}
# Candidate rules: overrides of torch_sparse.dispatch attributes.
RULES = {
    "committed": {},
    "leftover->token": {"K2Q_MIN_TOKENS": 1 << 40},
    "share 0.5, leftover->token": {"UNION_MAX_SHARE": 0.5, "K2Q_MIN_TOKENS": 1 << 40},
}


@contextlib.contextmanager
def rule(overrides):
    import torch_sparse.dispatch as d
    old = {k: getattr(d, k) for k in overrides}
    for k, v in overrides.items():
        setattr(d, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(d, k, v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--match", default=None, help="regex on 'heads cache shape selection'")
    ap.add_argument("--rules", default=None, help="comma-separated rule names (default: all)")
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = [(h, c, s, sel) for h in ("64/4", "16/1") for c in ("bfloat16", "fp8_e4m3")
            for s in SHAPES for sel in SELECTIONS]
    if args.quick:
        rows = [r for r in rows if r[2] == "64k"]
    if args.match:
        import re
        rows = [r for r in rows if re.search(args.match, " ".join(r))]
    rules = {k: v for k, v in RULES.items()
             if args.rules is None or k in args.rules.split(",")}
    results = []
    rng = np.random.default_rng(0)
    for heads, cache, shape, sel in rows:
        nh, nkv = map(int, heads.split("/"))
        spec = interop.SparseAttentionSpec(num_heads=nh, num_kv_heads=nkv, topk_blocks=16,
                                           kv_cache_dtype=cache)
        ql, sl = SHAPES[shape]
        case = Case(spec, ql, sl, rng, decode_query_len=max(ql) + 1, rho=SELECTIONS[sel],
                    scales=(1.0, 1.0) if spec.is_fp8 else None)
        idx = case.sample_idx(256)
        base = sample(case.torch_fn("token")(), idx)
        row = {"heads": heads, "cache": cache, "shape": shape, "selection": sel, "ms": {}}
        calls = {p: ({}, p) for p in ("token", "union", "k2q")}
        calls.update({f"auto[{name}]": (ov, "auto") for name, ov in rules.items()})
        for name, (ov, algo) in calls.items():
            with rule(ov):
                fn = case.torch_fn(algo)
                case.out.fill_(float("nan"))
                err = relative_error(sample(fn(), idx), base)
                if err > 1e-2:
                    raise AssertionError(f"{heads} {cache} {shape} {sel} {name}: err {err}")
                row["ms"][name] = torch_cold_ms(fn, rep_ms=args.rep_ms)
        row["tflops"] = {k: case.flops / (v * 1e-3) / 1e12 for k, v in row["ms"].items()}
        results.append(row)
        print(f"{heads} {cache} {shape} {sel}: " + ", ".join(
            f"{k} {v:.0f}" for k, v in row["tflops"].items()), flush=True)
        with open(os.path.join(args.out, "auto_rule.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\nworst ratio to the best forced path (and to token), per rule:")
    for name in rules:
        key = f"auto[{name}]"
        best = [min(r["ms"][p] for p in ("token", "union", "k2q")) / r["ms"][key] for r in results]
        tok = [r["ms"]["token"] / r["ms"][key] for r in results]
        print(f"  {name}: min {min(best):.3f} of best (mean {np.mean(best):.3f}), "
              f"min {min(tok):.3f} of token")


if __name__ == "__main__":
    main()
