"""``devstack.process.ChildProcess``: idempotent start, pid, SIGTERM then SIGKILL, log tail.

Real child processes (a few lines of Python each), no network.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from devstack.process import ChildProcess

# Prints a line, then waits; "ignore" makes it ignore SIGTERM (only SIGKILL ends it).
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("child up", flush=True)
time.sleep(120)
"""


class SleeperError(RuntimeError):
    pass


class Sleeper(ChildProcess):
    error = SleeperError  # the launcher's own type, raised by _raise_if_exited

    def start(self, mode: str = "obey") -> bool:
        return self._spawn([sys.executable, "-c", CHILD, mode])

    def wait_for_output(self) -> None:
        while "child up" not in self.log_tail():
            self._raise_if_exited("the sleeper")


def test_start_is_idempotent_and_stop_sends_sigterm(tmp_path: Path) -> None:
    child = Sleeper(log_path=tmp_path / "logs" / "child.log", stop_timeout_s=30)
    assert child.pid is None and not child.running and child.stop_blocking() is None
    assert child.start() is True
    first = child.pid
    assert child.start() is False and child.pid == first  # running: nothing new started
    child.wait_for_output()
    assert child.stop_blocking() == -signal.SIGTERM
    assert not child.running and child.pid == first  # the pid stays readable after the stop
    assert child.stop_blocking() == -signal.SIGTERM  # idempotent
    assert child.start() is True and child.pid != first  # stopped: a fresh child
    child.kill()
    assert child.returncode == -signal.SIGKILL


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    child = Sleeper(log_path=tmp_path / "child.log", stop_timeout_s=0.5)
    child.start("ignore")
    child.wait_for_output()
    assert child.stop_blocking() == -signal.SIGKILL


async def test_astop_and_the_log_tail_in_the_error(tmp_path: Path) -> None:
    child = Sleeper(log_path=tmp_path / "child.log", stop_timeout_s=30)
    child.start()
    child.wait_for_output()
    assert await child.astop() == -signal.SIGTERM
    with pytest.raises(SleeperError, match=r"exited with code -15 while starting.*\n.*child up"):
        child._raise_if_exited("the sleeper")
    assert child.log_tail(1) == "child up"
    assert Sleeper(log_path=tmp_path / "none.log", stop_timeout_s=1).log_tail() == "(no log yet)"
