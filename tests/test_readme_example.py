"""The README's Python API example runs as written, against a converted tiny model."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from test_generate import converted_tiny

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"<!-- api:begin -->(.*?)<!-- api:end -->", text, re.S)
    assert section, "README.md has no <!-- api:begin --> ... <!-- api:end --> section"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert code, "the Python API section has no ```python block"
    return code.group(1)


def test_readme_python_example_runs(tmp_path, tmp_path_factory):
    code = readme_example()
    assert 'edgemoe.Model("shards"' in code  # the example opens ./shards, made here
    shutil.copytree(converted_tiny(tmp_path_factory), tmp_path / "shards")
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode("utf-8").splitlines()
    assert re.search(r"^(stop|length) \{'prompt_tokens': \d+, 'completion_tokens': \d+, "
                     r"'total_tokens': \d+\}$", "\n".join(lines), re.M)
    assert re.match(r"prefill: \d+ tokens", lines[-1])
