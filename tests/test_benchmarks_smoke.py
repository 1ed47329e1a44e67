"""The benchmarks run end to end: `benchmarks/model_step.py --smoke` (CPU, interpreters, tiny
shapes) in a fresh process, every config measured and checked against the reference."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_step_smoke(tmp_path):
    out = tmp_path / "model_step.jsonl"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "model_step.py"), "--smoke", "--out",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["kind"] == "header"
    assert len(rows) == len(header["heads"]) * len(header["caches"]) * len(
        header["layers"]) * len(header["batches"]), rows
    for row in rows:
        assert "error" not in row, row
        assert row["max_err"] < 1e-2, row
        assert row["jax_cold_ms"] > 0 and row["torch_graph_cold_ms"] > 0, row
    table = (tmp_path / "model_step.jsonl.md").read_text()
    assert table.count("\n| ") == len(rows) + 1, table  # a header line and one per config
