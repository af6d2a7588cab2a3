"""Run ``cvdd`` commands as forked children of one process that has already imported cvdd and PyTorch.

Each child is a real process running the real CLI (``cvdd.cli.main``), which a test may SIGKILL, without
paying the ~4 s of Python and PyTorch imports of a fresh ``python -m cvdd`` at every start (the fault and
job-array tests start about 20 commands). The server never runs a tensor operation, so no thread pool exists
when it forks. It runs with ``OMP_NUM_THREADS=1``, as torchrun starts its workers.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

_SERVER = r"""
import json, os, sys, traceback
from cvdd.cli import main
import cvdd.api  # noqa: F401  (the API and torch, what every command imports; `import cvdd` alone loads neither)

for line in sys.stdin:
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.stdout.write(f"{pid}\n")
    sys.stdout.flush()
    sys.stdout.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n")
    sys.stdout.flush()
"""


def server_env() -> dict[str, str]:
    """One thread, unbuffered output, a fixed hash seed, and no torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


class ForkServer:
    """One server process; :meth:`start` a command, then :meth:`wait` for it (one command at a time)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.runs, self.pid = logs, 0, 0
        # Unbuffered binary pipes: select() then sees every line the server wrote (no hidden read-ahead buffer).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=server_env()
        )

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return line.decode()

    def start(self, args: list[str]) -> tuple[int, Path]:
        """Start ``cvdd ARGS``; returns the child's pid and the file receiving its stdout and stderr."""
        self.runs += 1
        log = self.logs / f"run{self.runs}.log"
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([args, str(log)]) + "\n").encode())
        self.proc.stdin.flush()
        self.pid = int(self._line(60))
        return self.pid, log

    def wait(self, timeout: float = 300) -> int:
        """Exit code of the last child (-9 when SIGKILLed); a child still running after ``timeout`` is killed."""
        try:
            return int(self._line(timeout))
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            self._line(60)
            raise TimeoutError(f"cvdd command of pid {self.pid} still running after {timeout} s") from None

    def run(self, args: list[str], timeout: float = 300) -> tuple[int, str]:
        """Run ``cvdd ARGS`` to the end: its exit code and its output (stdout and stderr together)."""
        _, log = self.start(args)
        code = self.wait(timeout)
        return code, log.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
