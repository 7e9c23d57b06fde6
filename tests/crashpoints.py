"""Kill a real process at every file-system step of an operation, one crash point per run.

`crash_at(operation, step)` forks a child that runs ``operation()`` and SIGKILLs itself at its
``step``-th file-system step: opening a file for writing (just after the open, when the file is already
truncated), fsync, and rename/replace/unlink (just before they happen). `sweep` visits step 1, 2, ...
until the operation survives, calling ``check(step)`` after every crash and ``reset()`` before each run,
so an operation with N steps is killed at all N points. Forking keeps a crash point cheap: the child
needs no fresh interpreter and no imports.
"""

from __future__ import annotations

import builtins
import io
import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_WRITE_MODES = set("wax+")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT | os.O_APPEND


@dataclass
class SweepResult:
    """What a sweep did: the steps the operation has, and where each crash happened."""

    steps: int = 0
    crashes: list[str] = field(default_factory=list)


def _install_tripwire(step: int, report: Any) -> None:
    """Make the ``step``-th file-system call of this (child) process SIGKILL it; tell ``report`` each step."""
    count = 0

    def tick(what: str, path: Any) -> None:
        nonlocal count
        count += 1
        report.send((count, f"{what} {os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else path}"))
        if count == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def before(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tick(name, args[0] if args else "")
            return function(*args, **kwargs)
        return wrapper

    real_open, real_os_open = io.open, os.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if _WRITE_MODES & set(mode):
            tick(f"open({mode})", file)
        return handle

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_os_open(path, flags, *args, **kwargs)
        if flags & _WRITE_FLAGS:
            tick("os.open", path)
        return fd

    builtins.open = io.open = open_
    os.open = os_open
    for name in ("replace", "rename", "unlink", "remove", "fsync"):
        setattr(os, name, before(f"os.{name}", getattr(os, name)))


def _child(operation: Callable[[], Any], step: int, report: Any) -> None:
    _install_tripwire(step, report)
    operation()
    report.send((0, "done"))


def crash_at(operation: Callable[[], Any], step: int, timeout: float = 120.0) -> tuple[bool, int, str]:
    """Run ``operation`` in a forked child killed at file-system step ``step``.

    Returns (crashed, steps seen, the step it died at). A child that fails otherwise raises.
    """
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_child, args=(operation, step, send))
    process.start()
    send.close()
    seen, last, done = 0, "", False
    try:
        while True:
            if not receive.poll(timeout):
                process.kill()
                raise TimeoutError(f"operation stuck for {timeout:.0f} s after step {seen}: {last}")
            try:
                count, what = receive.recv()
            except EOFError:
                break
            if count:
                seen, last = count, what
            else:
                done = True
    finally:
        process.join(timeout)
        receive.close()
    if process.exitcode == -signal.SIGKILL:
        return True, seen, last
    if done and process.exitcode == 0:
        return False, seen, ""
    raise RuntimeError(f"operation failed (exit code {process.exitcode}) after step {seen}: {last}")


def sweep(operation: Callable[[], Any], reset: Callable[[], None], check: Callable[[int, str], None],
          max_steps: int = 500) -> SweepResult:
    """Crash ``operation`` at each of its file-system steps in turn; ``check(step, where)`` after each crash."""
    result = SweepResult()
    for step in range(1, max_steps + 1):
        reset()
        crashed, seen, where = crash_at(operation, step)
        if not crashed:
            result.steps = seen
            return result
        result.crashes.append(where)
        check(step, where)
    raise RuntimeError(f"operation still running after {max_steps} crash points")
