"""Command line: ``jaxws demo`` runs the main job; ``jaxws bench`` the benchmarks.

``python -m jaxws.cli demo`` is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxws", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train on the digits dataset under each workspace mode, with a chart")
    bench = sub.add_parser("bench", help="run the benchmark scripts (one JSON line per figure)")
    bench.add_argument("names", nargs="*", help="benchmark names (default: all)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxws.demo import main as demo

        demo()
        return 0
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    known = sorted(p.stem for p in root.glob("*.py"))
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    scripts = [root / f"{n}.py" for n in args.names or known]
    for script in scripts:
        code = subprocess.call([sys.executable, str(script)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
