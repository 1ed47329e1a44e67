"""The benchmarks run end to end on CPU (Triton interpreter, Pallas interpret mode, tiny
shapes), each in a fresh process: `bench.py --rows smoke` (one decode and one prefill row,
every path checked against the per-token kernel and the float64 reference) and
`model_step.py --smoke` (one config, checked against the reference). A broken benchmark
fails here: a row or path that raises makes the script exit 1."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERR_LIMIT = 1e-2


def _run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_bench_smoke(tmp_path):
    _run("bench.py", "--rows", "smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["kind"]: r for r in result["rows"]}
    assert len(result["rows"]) == 2 and set(rows) == {"decode", "prefill"}, result["rows"]
    decode = rows["decode"]
    assert decode["torch_vs_jax_err"] < ERR_LIMIT, decode
    for key in ("torch", "torch_graph", "jax", "jax_pipelined", "torch_graph_cold"):
        assert decode[f"{key}_ms"] > 0, (key, decode)
    prefill = rows["prefill"]
    assert prefill["token_vs_f64_err"] < ERR_LIMIT, prefill
    for path, res in prefill["paths"].items():
        if path in ("mosaic", "peer") and "note" in res:  # Hopper only; the peer when absent
            continue
        assert res["tflops"] > 0, (path, res)
        assert res["err_vs_token"] < ERR_LIMIT and res["err_vs_f64"] < ERR_LIMIT, (path, res)
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n| 16/1 |") == 1 + 1 + len(prefill["paths"]), table


def test_model_step_smoke(tmp_path):
    out = tmp_path / "model_step.jsonl"
    _run("model_step.py", "--smoke", "--out", str(out))
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["kind"] == "header"
    assert len(rows) == len(header["heads"]) * len(header["caches"]) * len(
        header["layers"]) * len(header["batches"]), rows
    for row in rows:
        assert "error" not in row, row
        assert row["max_err"] < ERR_LIMIT, row
        assert row["jax_cold_ms"] > 0 and row["torch_graph_cold_ms"] > 0, row
    table = (tmp_path / "model_step.jsonl.md").read_text()
    assert table.count("\n| ") == len(rows) + 1, table  # a header line and one per config
