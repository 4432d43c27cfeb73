"""Every ```python block of README.md and docs/*.md runs (the user guide cannot rot)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCKS = [(p, i, b) for p in DOCS if p.exists()
          for i, b in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), re.S))]


@pytest.mark.parametrize("path, index, code", BLOCKS,
                         ids=[f"{p.name}:{i}" for p, i, _ in BLOCKS])
def test_doc_example_runs(path, index, code):
    exec(compile(code, f"{path.name}[{index}]", "exec"), {"__name__": "__doc_example__"})


def test_there_are_examples():
    assert len(BLOCKS) >= 1
