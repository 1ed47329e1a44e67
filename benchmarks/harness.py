"""What the benchmark scripts share. Import it before any kernel module: on import it sets the
environment (with `--smoke` on the command line: the Triton interpreter and JAX on CPU; JAX
never preallocates GPU memory) and puts the checkout (and the peer's `.peer/`, from
tools/peer-setup.sh, when present) on the import path, so the scripts run without installing.
"""
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.path.isdir(os.path.join(ROOT, ".peer")):
    sys.path.append(os.path.join(ROOT, ".peer"))


def capture_graph(fn, warmups: int = 3):
    """A CUDA graph of fn(), captured after `warmups` calls (compiles) on a side stream."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
