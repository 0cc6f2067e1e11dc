"""Multi-node recovery benchmark: how long a two-instance run needs to train again.

``python -m bench recovery`` runs the two-instance scenarios of ``emulator/scenarios``
through the local cloud (``python -m emulator run``), one after another, and reads each
report's event log. For every disruption (a spot notice, a hung peer, a lost leader) it
prints the seconds until the next round started and the steps that round repeats, then
one JSON line. The local cloud compresses time (a 10 s notice, a 10 s lease TTL, a 10 s
collective timeout, see ``emulator/scenario.py``), so the figures show where the time
goes, not what EC2 takes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("two-nodes", "two-nodes-interrupted", "two-nodes-leader-interrupted",
             "two-nodes-peer-hang", "two-nodes-leader-lost")
RUN_TIMEOUT_S = 900


def run_scenario(name: str, work_dir: Path) -> dict:
    report_path = work_dir / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "emulator", "run",
         "--scenario", str(REPO_ROOT / "emulator" / "scenarios" / f"{name}.json"),
         "--report", str(report_path), "--work-dir", str(work_dir / name)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"scenario {name} failed with exit code {result.returncode}:\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(report_path.read_text())


def disruption(report: dict) -> tuple[float, int | None] | None:
    """Return (time, step) of the scenario's notice or fault, or None for neither."""
    if report["notices_sent"]:
        notice = report["notices_sent"][0]
        return notice["sent_at"], notice["step"]
    if report["faults_injected"]:
        fault = report["faults_injected"][0]
        return fault["at"], fault["step"]
    return None


def recovery(report: dict) -> dict:
    """Return the figures of one report: run time, recovery time and repeated steps."""
    figures = {"duration_s": report["duration_s"], "recovery_s": None, "steps_repeated": None}
    hit = disruption(report)
    if hit is None:
        return figures
    hit_time, hit_step = hit
    rounds = [event for event in report["events"]
              if event["type"] == "round_started" and event["time"] > hit_time]
    if rounds:
        figures["recovery_s"] = round(rounds[0]["time"] - hit_time, 1)
        resume_step = rounds[0].get("resume_step") or 0
        if hit_step is not None:
            figures["steps_repeated"] = max(0, hit_step - resume_step)
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this scenario (repeatable; default: all five)")
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)

    results = {}
    with tempfile.TemporaryDirectory(prefix="spotrun-bench-") as scratch:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = recovery(run_scenario(name, Path(scratch)))

    print(f"{'scenario':<30} {'run (s)':>8} {'recovery (s)':>13} {'steps repeated':>15}")
    for name, figures in results.items():
        recovery_s = "-" if figures["recovery_s"] is None else f"{figures['recovery_s']:.1f}"
        repeated = "-" if figures["steps_repeated"] is None else str(figures["steps_repeated"])
        print(f"{name:<30} {figures['duration_s']:>8.1f} {recovery_s:>13} {repeated:>15}")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
