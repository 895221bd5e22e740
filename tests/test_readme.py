"""Every ```python block in README.md runs, top to bottom, as a reader would paste them: in one
namespace, in order (a block may use what an earlier one defined)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_readme_has_python_snippets():
    assert len(python_blocks()) >= 4


def test_every_readme_snippet_runs(capsys):
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README.md snippet at line {line} failed: {error!r}") from error
    assert "convert:" in capsys.readouterr().out  # print(report) printed the report
