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


def _kj_names(text):
    """The dotted names the prose and code of a document use as ``kj.X`` or ``krylovjax.X.Y``."""
    return set(re.findall(r"\bkj\.([A-Za-z_][\w.]*\w)", text)) | set(
        re.findall(r"\bkrylovjax\.([A-Za-z_][\w.]*\w)", text))


def test_every_public_name_and_every_name_the_docs_use_exists():
    import importlib

    import krylovjax as kj

    missing = [n for n in kj.__all__ if not hasattr(kj, n)]
    for path in DOCS:
        for dotted in sorted(_kj_names(path.read_text())):
            obj, parts = kj, dotted.split(".")
            for i, part in enumerate(parts):
                if not hasattr(obj, part):
                    try:  # a submodule not imported yet (krylovjax.models.unet)
                        obj = importlib.import_module("krylovjax." + ".".join(parts[:i + 1]))
                        continue
                    except ImportError:
                        pass
                    if part in ("py", "md"):  # a file name such as krylovjax/store.py
                        break
                    missing.append(f"{path.name}: kj.{dotted}")
                    break
                obj = getattr(obj, part)
    assert not missing, missing
