"""A real Triton Inference Server on this CPU machine, for tests/test_triton.py and benchmarks/triton_load.py.

The pip package nvidia-pytriton ships a `tritonserver` binary (Triton 2.51) with the Python backend; the recipe
measured in ../shared/SETUP.md: the backend's Python environment is a virtual environment made with
/usr/bin/python3.11 (the backend stub links the system libpython), holding what the exported model imports
(onnxruntime, numpy, Pillow; no torch) and nvidia-pytriton; the stub is copied into a backend directory; the
server runs with that environment's bin/ first on PATH and nvidia-pytriton's libraries on LD_LIBRARY_PATH.

`server_environment()` makes that environment once (in .bench/triton-env, or $RESCASCADE_TRITON_ENV) and raises
TritonUnavailable with one line where it cannot; `TritonServer(repo)` starts the server on 127.0.0.1 (free ports)
and stops it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3.11"
PACKAGES = ["nvidia-pytriton==0.7.0", "onnxruntime", "numpy", "pillow"]


class TritonUnavailable(RuntimeError):
    """The Triton server cannot run here (no system Python 3.11, no package, the binary does not start)."""


def server_environment(where: Path | None = None, log=print) -> Path:
    """The virtual environment the server and its Python backend run in (made on first use: ~1-2 minutes)."""
    env = Path(where or os.environ.get("RESCASCADE_TRITON_ENV") or ROOT / ".bench" / "triton-env")
    if (env / ".ready").is_file():
        return env
    if not Path(SYSTEM_PYTHON).is_file():
        raise TritonUnavailable(f"Triton's Python backend needs {SYSTEM_PYTHON} (the stub links the system "
                                "libpython); not here")
    log(f"making Triton's Python environment in {env} (nvidia-pytriton, onnxruntime, numpy, Pillow) ...")
    shutil.rmtree(env, ignore_errors=True)
    steps = [[SYSTEM_PYTHON, "-m", "venv", str(env)],
             [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", *PACKAGES]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise TritonUnavailable(f"{' '.join(cmd[:4])} failed: {(res.stderr or res.stdout).strip()[-300:]}")
    (env / ".ready").write_text("")
    return env


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def _backend_dir(env: Path) -> Path:
    """Triton's backends with the Python 3.11 stub in python/ (as pytriton lays them out for itself)."""
    tritonserver = _site_packages(env) / "pytriton" / "tritonserver"
    backends = env / "triton-backends"
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        shutil.copytree(tritonserver / "backends", backends, dirs_exist_ok=True)
        shutil.copy2(tritonserver / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
                     backends / "python" / "triton_python_backend_stub")
    return backends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo) as server:` a tritonserver on 127.0.0.1 serving the model repository `repo`;
    server.url is its HTTP address (host:port), server.metrics_url its metrics page. Raises TritonUnavailable
    when it does not become ready within `timeout` seconds (its log's last lines say why)."""

    def __init__(self, repo, env: Path | None = None, timeout: float = 180.0, log=print):
        self.repo, self.timeout, self.log = Path(repo), timeout, log
        self.env = server_environment(env, log)
        self.proc = None

    def start(self) -> "TritonServer":
        binary = _site_packages(self.env) / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        if not binary.is_file():
            raise TritonUnavailable(f"no tritonserver binary at {binary}")
        self.http, self.grpc, self.metrics = _free_port(), _free_port(), _free_port()
        self.url, self.metrics_url = f"127.0.0.1:{self.http}", f"http://127.0.0.1:{self.metrics}/metrics"
        env = {**os.environ, "PATH": f"{self.env / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "LD_LIBRARY_PATH": str(_site_packages(self.env) / "nvidia_pytriton.libs")}
        env.pop("PYTHONPATH", None)
        self.log_path = self.repo.parent / f"{self.repo.name}.tritonserver.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(binary), "--model-repository", str(self.repo), "--backend-directory", str(_backend_dir(self.env)),
             "--http-address", "127.0.0.1", "--http-port", str(self.http), "--grpc-address", "127.0.0.1",
             "--grpc-port", str(self.grpc), "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics),
             "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "false", "--log-verbose", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        tail = self.log_path.read_text().strip().splitlines()[-5:]
        raise TritonUnavailable("tritonserver did not become ready: " + " | ".join(tail))

    def stop(self, kill: bool = False) -> None:
        """Stop the server (kill: SIGKILL at once, as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def classify(url: str, model: str, images: list[bytes]) -> dict:
    """One request of encoded images to `model` with tritonclient: {output name: array [N]}."""
    import numpy as np
    import tritonclient.http as http
    client = http.InferenceServerClient(url)
    data = np.array(images, dtype=object).reshape(-1, 1)
    tensor = http.InferInput("IMAGE", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    names = ("LABEL", "CLASS_NAME", "PROBABILITY", "EXIT_STAGE", "RESOLUTION", "STAGE", "ERROR")
    result = client.infer(model, [tensor], outputs=[http.InferRequestedOutput(n) for n in names])
    return {n: result.as_numpy(n).reshape(-1) for n in names}


if __name__ == "__main__":  # python benchmarks/_triton.py REPO: serve a repository until interrupted
    with TritonServer(sys.argv[1]) as server:
        print(f"serving {sys.argv[1]} at http://{server.url} (metrics {server.metrics_url}); Ctrl-C stops")
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
