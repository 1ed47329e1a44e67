"""Test helper: run a function of a test module compiled, not interpreted, on this machine.

Under the CPU test run TRITON_INTERPRET=1 is set before any kernel module is imported, so a
kernel compiled for a GPU target has to come from a fresh process without it.
"""
import os
import subprocess
import sys


def run_without_interpreter(module: str, function: str, timeout: int = 240) -> list[str]:
    """Run `tests.<module>.<function>()` in a child process with TRITON_INTERPRET unset;
    returns its printed lines (a failure in the child fails the caller's test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", f"from tests.{module} import {function} as f; f()"],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()
