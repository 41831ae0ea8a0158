"""The README's Python API section runs as written: its `edgemoe convert` command on the
bundled model, then its Python example, in a fresh directory."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def api_section() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"<!-- api:begin -->(.*?)<!-- api:end -->", text, re.S)
    assert section, "README.md has no <!-- api:begin --> ... <!-- api:end --> section"
    return section.group(1)


def test_readme_python_example_runs(tmp_path):
    section = api_section()
    commands = re.search(r"```sh\n(.*?)```", section, re.S)
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert commands and code, "the Python API section needs a ```sh and a ```python block"
    (tmp_path / "models").symlink_to(ROOT / "models")  # paths in the README are repo-relative
    for line in commands.group(1).strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "edgemoe", line
        proc = subprocess.run([sys.executable, "-m", "edgemoe", *argv[1:]], cwd=tmp_path,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
    (tmp_path / "example.py").write_text(code.group(1), encoding="utf-8")
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode("utf-8")
    lines = out.splitlines()
    assert re.search(r"^(stop|length) \{'prompt_tokens': \d+, 'completion_tokens': \d+, "
                     r"'total_tokens': \d+\}$", out, re.M)
    assert re.match(r"prefill: \d+ tokens", lines[-1])
    # the bundled model is trained: its greedy continuation is words, not noise
    assert re.search(r"[A-Za-z]{3,} [A-Za-z]{2,} [A-Za-z]{2,}", out), out
