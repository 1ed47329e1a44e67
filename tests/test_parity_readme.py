"""The README's examples run as written (both front ends, so it sits with the parity tests)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    code = BLOCKS[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    # Examples that compare with the float64 reference print their error: it must be small.
    for value in re.findall(r"(?:reference|jax):\s*([0-9.eE+-]+|nan|inf)", printed):
        assert float(value) < 0.05, f"README block {index} printed {printed!r}"
