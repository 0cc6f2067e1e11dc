"""Command line: ``python -m bench NAME [options]`` with NAME ``checkpoint`` or ``recovery``."""

from __future__ import annotations

import sys

from bench import checkpoint, recovery

BENCHMARKS = {"checkpoint": checkpoint.main, "recovery": recovery.main}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m bench NAME [options], where NAME is one of: {names}", file=sys.stderr)
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
