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


class TrainerProcess:
    """One start of the training command, in its own process group."""

    def __init__(self, command: list[str], *, env: dict[str, str], cwd: Path,
                 log_path: Path) -> None:
        self.command = [sys.executable if part == "{python}" else part for part in command]
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

    def send(self, signal_number: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal_number)

    def kill(self) -> None:
        """Kill the whole process group (the trainer and anything it started)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
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
