"""Re-read a committed plan-quality result with the current statistics, without running anything (the per-seed
finals are in it); the arithmetic lives in ``benchmarks.harness.report``.

  python -m benchmarks.plan_quality_report --reread benchmarks/results/plan_quality.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.report import reread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="re-read a plan-quality result with the current statistics")
    parser.add_argument("--reread", required=True, type=Path, help="a plan_quality*.json written by the benchmark")
    args = parser.parse_args(argv)
    reread(args.reread)
    print(f"rewrote {args.reread} and {args.reread.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
