"""Every Python example in README.md and docs/*.md runs as written (in a scratch directory).

An example that starts with ``import lightning as L`` is run in a fresh interpreter twice: as written, and with
``import pytorch_lightning as L`` instead, since it claims to work under either Lightning package.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{path.name}#{i}")
    for path in DOCS
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]
EITHER = "import lightning as L"


def _shorten(code: str) -> str:
    # Examples are written for real runs; keep them short here without changing their text.
    code = re.sub(r"max_steps=\d+", "max_steps=3", code)
    return re.sub(r"max_epochs=\d+", "max_epochs=1", code)


@pytest.mark.parametrize("code", BLOCKS)
def test_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _shorten(code)
    if EITHER not in code:
        exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
        return
    pytest.importorskip("lightning")
    for variant in (code, code.replace(EITHER, "import pytorch_lightning as L")):
        out = subprocess.run([sys.executable, "-c", variant], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, f"{variant.splitlines()[0]}\n{out.stderr[-3000:]}"
