"""The installed package: one import root, and layers that only import downward (import-linter's contract in
pyproject.toml), checked on a real install of this checkout (not the editable one, whose finder maps folders)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    for name in ("cascade", "training", "profiling"):  # a copy: setuptools writes build/ beside what it installs
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(source)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return target


def test_the_only_new_import_name_is_rescascade(installed):
    names = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert names == {"rescascade"}
    code = ("import rescascade.cli, rescascade.training.data, rescascade.profiling.backends.onnxruntime_backend, sys; "
            "print(rescascade.__file__); print('training' in sys.modules, 'cascade' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=installed,
                         env={**os.environ, "PYTHONPATH": str(installed)})
    assert run.returncode == 0, run.stderr[-2000:]
    where, stray = run.stdout.splitlines()
    assert Path(where).is_relative_to(installed) and stray == "False False"


def test_layers_import_only_downward(installed):
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(installed)})
    assert run.returncode == 0 and "0 broken" in run.stdout, run.stdout[-3000:]


def test_import_rescascade_is_light_and_exports_the_journey():
    # light: no torch for `import rescascade`, nor for reading a cascade.json and counts (`rescascade drift`)
    code = ("import sys, rescascade, rescascade.config, rescascade.monitor; light = 'torch' not in sys.modules\n"
            "missing = [n for n in rescascade.__all__ if not hasattr(rescascade, n)]\n"
            "print(light, missing, issubclass(rescascade.ConfigError, ValueError))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["True", "[]", "True"], run.stdout + run.stderr[-2000:]
