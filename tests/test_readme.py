"""The README's Python journey, run exactly as written (in a fresh process, in an empty directory)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def journey() -> str:
    text = README.read_text()
    found = re.search(r"<!-- python-journey -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md lost its <!-- python-journey --> block"
    return found.group(1)


@pytest.mark.slow
def test_the_readme_python_journey_runs(tmp_path):
    code = journey()
    assert len(code.strip().splitlines()) <= 16  # the journey stays short enough to read at a glance
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "runs" / "py" / "cascade.json").is_file()
    last = run.stdout.strip().splitlines()[-1]  # label, exit stage, errors of the one image
    assert re.match(r"\[\d+\] \[\d\] \{\}$", last), run.stdout[-2000:]  # no errors
