"""benchmarks/indexer_bench.py runs end to end on CPU (Triton interpreter, Pallas interpret
mode, tiny shapes) in a fresh process, one decode row, every path checked against the float64
reference: a broken benchmark fails here."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_indexer_bench_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "indexer_bench.py"), "--smoke",
         "--match", "decode b2 h1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "indexer_bench.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["decode b2 h1"], rows
    paths = rows[0]["paths"]
    for path in ("torch", "torch:graph", "jax:pallas", "jax:xla"):
        assert paths[path]["ms"] > 0, (path, paths)
    for path in ("torch", "jax:pallas", "jax:xla"):
        assert paths[path]["bad"] == 0 and paths[path]["exact"] == 1.0, (path, paths)
    assert "| decode b2 h1 | torch |" in (tmp_path / "indexer_bench.md").read_text()
