"""Shared test setup: interpreters on CPU, the `gpu` marker, seeded generators, one process on
a GPU machine, a faster Triton interpreter, and the summary of which kernel paths ran."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


HAS_CUDA = _has_cuda()

# PyTorch and JAX share the GPU: keep JAX from reserving most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Four host devices for the mesh tests (tests/test_jax_sharding.py), set before JAX starts its
# CPU backend. The default device stays cpu:0, so single-device tests see no difference.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4"]))

# The Triton interpreter must be chosen before any kernel module is imported.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# XLA's CPU compiler with its older elemental emitters: the interpreted Pallas kernels compile
# about a third faster and run faster (jaxlib 0.10: 15.4 -> 9.7 s of compilation for seven
# of them), with the same operations. An unknown flag aborts XLA, so a jaxlib version it was
# not checked on is asked first (a child process). SPARSE_TESTS_PLAIN_XLA=1 leaves XLA alone.
_XLA_CPU_FLAG = "--xla_cpu_use_fusion_emitters=false"
_CHECKED_JAXLIB = ((0, 10),)


def _xla_takes(flag: str) -> bool:
    try:
        from importlib.metadata import version
        jaxlib = tuple(int(x) for x in version("jaxlib").split(".")[:2])
    except Exception:  # noqa: BLE001 - no jaxlib: nothing to set
        return False
    if jaxlib in _CHECKED_JAXLIB:
        return True
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([sys.executable, "-c", "import jax.numpy as j; j.zeros(1) + 1"],
                           env=env, capture_output=True, timeout=120)
    return probe.returncode == 0


if (not HAS_CUDA and os.environ.get("SPARSE_TESTS_PLAIN_XLA") != "1"
        and _XLA_CPU_FLAG.split("=")[0] not in os.environ["XLA_FLAGS"]
        and _xla_takes(_XLA_CPU_FLAG)):
    os.environ["XLA_FLAGS"] += " " + _XLA_CPU_FLAG

# One compilation cache on disk for the run, shared by the xdist workers: a function the other
# worker already compiled (same HLO) is loaded instead of compiled again. Created by the first
# process (the controller under xdist), inherited by the workers, removed at its exit.
if (not HAS_CUDA and "JAX_COMPILATION_CACHE_DIR" not in os.environ
        and os.environ.get("SPARSE_TESTS_PLAIN_XLA") != "1"):
    _cache_dir = tempfile.mkdtemp(prefix="sparse-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """pytest-xdist's worker count when `-n` is given nowhere (command line, addopts,
    PYTEST_ADDOPTS): two on a CPU machine, where the Triton interpreter and XLA's compiler each
    keep one core busy; one process on a CUDA machine, where the GPU tests share one process's
    compiled kernels and an xdist run once hung in worker shutdown after every test passed.
    `-n N` (`-n 0`: one process) or `-p no:xdist` always wins."""
    if (not hasattr(config.option, "numprocesses") or hasattr(config, "workerinput")
            or config.option.numprocesses is not None or config.getoption("usepdb", False)
            or config.option.collectonly):
        return
    workers = 0 if HAS_CUDA else min(2, os.cpu_count() or 1)
    config.option.numprocesses = workers if workers > 1 else 0
    if not config.option.numprocesses:
        config.option.dist = "no"


def _speed_up_triton_interpreter() -> None:
    """Two costs of Triton's CPU interpreter that change nothing it computes (test runs only;
    SPARSE_TESTS_PLAIN_INTERPRETER=1 turns this off):

    - Every call of a @triton.jit helper inside a kernel re-patches triton.language
      (inspect.getmembers over the language modules): a third of an interpreted launch here.
      The patch is the same within a launch, so it is done once per launch for each set of
      language modules a function sees (triton.language, triton.language.core).
    - tl.dot runs np.matmul(..., dtype=accumulator), which NumPy computes without BLAS (16-bit
      inputs: 6x slower). The inputs are converted to the accumulator type first (exact for
      16-bit floats and FP8 values), then multiplied in that type as before.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get(
            "SPARSE_TESTS_PLAIN_INTERPRETER") == "1":
        return
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter as ti
        patch_lang, grid_call = ti._patch_lang, ti.GridExecutor.__call__
        convert_float, handle = ti._convert_float, ti.TensorHandle
        ti.InterpreterBuilder.create_dot  # noqa: B018 - present in this version
    except (ImportError, AttributeError):
        return
    patched = set()

    class _Nothing:
        def restore(self):
            pass

    def once_per_launch(fn):
        key = frozenset(id(v) for v in fn.__globals__.values()
                        if inspect.ismodule(v) and v in (tl, tl.core))
        if key in patched:
            return _Nothing()
        patched.add(key)
        return patch_lang(fn)

    def launch(self, *args, **kwargs):
        patched.clear()  # the launch patches (and afterwards restores) the language anew
        return grid_call(self, *args, **kwargs)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or \
                (b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):
            a_data = convert_float(a_data, a.dtype, tl.float16, None).view(np.float16)
            b_data = convert_float(b_data, b.dtype, tl.float16, None).view(np.float16)
        acc = d.data.dtype
        return handle(np.matmul(a_data.astype(acc), b_data.astype(acc)) + d.data,
                      d.dtype.scalar)

    ti._patch_lang = once_per_launch
    ti.GridExecutor.__call__ = launch
    ti.InterpreterBuilder.create_dot = create_dot


_INSTALLED = []


def pytest_pycollect_makemodule(module_path, parent):
    """Before the first test module is imported (in each process that collects): the faster
    interpreter and the path recorders (tests/paths.py), so that names test modules import
    from the front ends are the recording ones."""
    if not _INSTALLED:
        _INSTALLED.append(True)
        _speed_up_triton_interpreter()
        from tests import paths
        paths.install()


def pytest_collection_modifyitems(config, items):
    """Without `-m`, the `slow` cases are left out (`pytest -m slow` runs them; .ci/run does);
    without a GPU, the `gpu` ones are skipped."""
    if not config.option.markexpr:
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh per case, reproducible per run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


# --- which kernel paths ran --------------------------------------------------------------------

_PATHS_START = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    from tests import paths
    item.stash[_PATHS_START] = len(paths.RUNS)
    timing = os.environ.get("SPARSE_TESTS_TIMING")
    if timing:
        _timing_line(timing, f"{item.nodeid} running")
        start = time.perf_counter()
    yield
    if timing:
        _timing_line(timing, f"{item.nodeid} {time.perf_counter() - start:.2f}")


def _timing_line(path: str, line: str) -> None:
    """SPARSE_TESTS_TIMING=<file>: one line when a test starts ("<nodeid> running") and one
    when it ends ("<nodeid> <seconds>", setup to teardown), appended and flushed at once, so a
    run that is killed or hangs leaves the time of every finished test and the name of the
    one it was in (xdist workers append to the same file)."""
    with open(path, "a") as f:
        f.write(line + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The paths a test ran (setup, call and teardown) go into its user_properties before its
    last report is made: pytest-xdist carries them back to the controlling process (and
    --junitxml writes them)."""
    if call.when == "teardown" and _PATHS_START in item.stash:
        from tests import paths
        item.user_properties.append(("paths", paths.RUNS[item.stash[_PATHS_START]:]))
    yield


_SEEN = set()


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        for name, value in report.user_properties:
            if name == "paths":
                _SEEN.update(tuple(run) for run in value)


def pytest_terminal_summary(terminalreporter):
    from tests import paths
    terminalreporter.write_line(paths.summary(_SEEN))
