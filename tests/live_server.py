"""A real ``monailabel start_server`` process on 127.0.0.1 for tests: start, stop, SIGKILL, restart.

Every start appends to one log file (with a header per start), so a failing test shows what each
server incarnation said. ``stop()`` also ends whatever the server started (train/scoring subprocesses,
torchrun and its workers), so no test leaks processes into the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.model_store import ModelStore
from lib.paths import REPO_ROOT
from lib.serve import server_command

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not answer /info in time; the message ends with its log."""


class LiveServer:
    """One studies folder served by a real server process; each ``start()`` picks a fresh port."""

    def __init__(self, studies: Path, conf: dict[str, str], log_path: Path, startup_timeout: float = 180.0,
                 env: dict[str, str] | None = None):
        self.studies, self.conf, self.log_path = Path(studies), dict(conf), Path(log_path)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self._client: MONAILabelClient | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LiveServer:
        """Start the server and wait until ``/info`` answers; raise ServerStartError otherwise."""
        if self.running:
            raise RuntimeError(f"server already running (pid {self.pid})")
        self.port, self.starts = free_port(), self.starts + 1
        bin_dir = Path(sys.executable).parent
        env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"} | self.env
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts} on port {self.port} =====\n")
            log.flush()
            self.process = subprocess.Popen(server_command(self.conf, self.studies, HOST, self.port), env=env,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        self._client = MONAILabelClient(self.url, tmpdir=str(self.log_path.parent / "client"))
        self._wait_until_ready()
        return self

    def stop(self, kill: bool = False, timeout: float = 30.0) -> int | None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``) and every process it started; its exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(timeout=timeout)
        kill_processes(descendants)
        return code

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("server is not running")
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def client(self) -> MONAILabelClient:
        if self._client is None:
            raise RuntimeError("server was never started")
        return self._client

    def descendants(self) -> list[psutil.Process]:
        """Every live process the server started (train/scoring tasks, torchrun and its workers)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_for_training(self, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``GET /train/`` until the latest train task has ended; its status record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.train_status()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(1)
        raise TimeoutError(f"training still running after {timeout:.0f} s")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while (error := self._not_ready()) is not None:
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise ServerStartError(f"server did not start ({error}):\n{self.log_tail()}") from error
            time.sleep(0.5)

    def _not_ready(self) -> Exception | None:
        """None once the app answers ``/info`` (a 401 counts: authentication is on and the app is up)."""
        try:
            self.client.info()
        except MONAILabelClientException as error:
            return None if error.status_code == 401 else error
        except Exception as error:  # connection refused while starting, 5xx while the app loads
            return error
        return None


def kill_processes(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL the given processes (ignoring those already gone) and wait until they are."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=timeout)


def prepare_site(root: Path, images: list[Path], checkpoint: Path, conf: dict[str, str],
                 env: dict[str, str] | None = None) -> LiveServer:
    """A studies folder holding copies of ``images``, ``checkpoint`` published as the round-1 unet, and a
    (not yet started) server over both; models and runs live under ``root``."""
    studies = root / "studies"
    studies.mkdir(parents=True)
    for image in images:
        shutil.copy(image, studies / image.name)
    ModelStore(root / "models").publish("unet", checkpoint, {"mode": "full"})
    conf = {**conf, "model_dir": str(root / "models"), "runs_dir": str(root / "runs")}
    return LiveServer(studies, conf, root / "server.log", env=env)
