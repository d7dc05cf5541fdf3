"""Every Python example in README.md and docs/*.md runs as written (in a scratch directory)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{path.name}#{i}")
    for path in DOCS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Examples are written for real runs; keep them short here without changing their text.
    code = re.sub(r"max_steps=\d+", "max_steps=3", code)
    code = re.sub(r"max_epochs=\d+", "max_epochs=1", code)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
