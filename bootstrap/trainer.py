"""The supervisor's handle on the training process: a child process and its progress file."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

log = logging.getLogger("spotrun.trainer")


def child_pids(pid: int) -> list[int]:
    """Return the ids of the processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name in brackets may contain spaces; the parent id follows it.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def descendant_pids(pid: int) -> list[int]:
    """Return the ids of every process below ``pid``, children first."""
    found: list[int] = []
    pending = [pid]
    while pending:
        children = child_pids(pending.pop())
        found.extend(children)
        pending.extend(children)
    return found


class TrainerProcess:
    """One start of the training command, in its own process group.

    With ``signal_children`` the command is a launcher (torchrun through ``ml.launch``)
    and the contract's signals go to its children, the training processes, which
    torchrun starts in sessions of their own.
    """

    def __init__(self, command: list[str], *, env: dict[str, str], cwd: Path,
                 log_path: Path, signal_children: bool = False) -> None:
        self.command = [sys.executable if part == "{python}" else part for part in command]
        self.signal_children = signal_children
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab")
        self.process = subprocess.Popen(
            self.command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("trainer started (pid %d): %s", self.process.pid, " ".join(self.command))

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and not self._log_file.closed:
            self._log_file.close()
        return code

    def send(self, signal_number: int) -> int:
        """Send a signal to the training process(es); return how many were signalled."""
        if self.process.poll() is not None:
            return 0
        if not self.signal_children:
            self.process.send_signal(signal_number)
            return 1
        workers = child_pids(self.process.pid)
        if not workers:
            log.warning("no training process runs under the launcher yet; signal %d not sent",
                        signal_number)
        sent = 0
        for pid in workers:
            try:
                os.kill(pid, signal_number)
                sent += 1
            except ProcessLookupError:
                pass
        return sent

    def kill(self) -> None:
        """Kill the trainer's process group and every process below it.

        torchrun starts each training process in a session of its own, so killing the
        group alone would leave them running.
        """
        below = descendant_pids(self.process.pid)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.poll()

    def tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as handle:
                return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
        except OSError as error:
            return [f"(trainer log unreadable: {error})"]


class ProgressReader:
    """Read new JSON lines of the trainer's progress file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.latest: dict | None = None

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        records = []
        for line in complete:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring malformed progress line: %r", line[:200])
        if records:
            self.latest = records[-1]
        return records

    @property
    def step(self) -> int | None:
        return int(self.latest["step"]) if self.latest else None
