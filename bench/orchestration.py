"""Orchestration benchmark: what share of a round's wall time is Prefect's, from what the
run stored (`rounds` start and finish, `stage_metrics` per stage, engine start-up and the
flow's own store work). Also the end-to-end split of each round by stage.

    .venv/bin/python bench/orchestration.py [--db data/prefloop.duckdb] [--run demo]

With no finished round in the database, it first runs one round of the demo config into
a temporary database (about 6 minutes on 2 cores). Target: orchestration <= 2%.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.report import time_split  # noqa: E402
from pipeline.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def finished_rounds(db: Path, run: str) -> dict:
    if not db.exists():
        return {}
    with Store(db, read_only=True) as store:
        data = store.report_data(run)
    return time_split([r for r in data["rounds"] if r["status"] == "finished"], data["stages"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", type=Path, default=ROOT / "data" / "prefloop.duckdb")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--config", type=Path, default=ROOT / "data" / "configs" / "demo.yaml")
    args = ap.parse_args()

    split = finished_rounds(args.db, args.run)
    # Rounds stored before stage set-up times were recorded have no split to read.
    if not split or all("flow (store, engine stop)" not in s for s in split.values()):
        tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
        args.db = tmp / "bench.duckdb"
        print(f"no timed rounds of run {args.run!r}: running one demo round into {args.db}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "run",
                "--config",
                str(args.config),
                "--rounds",
                "1",
                "--set",
                f"db_path={args.db}",
                "--set",
                f"runs_dir={tmp}/runs",
                "--set",
                f"name={args.run}",
            ],
            cwd=ROOT,
            check=True,
        )
        split = finished_rounds(args.db, args.run)

    print(f"\nrun {args.run!r} in {args.db}")
    worst = 0.0
    for round_, parts in split.items():
        wall = parts.pop("wall_s")
        share = parts["orchestration"] / wall
        worst = max(worst, share)
        print(f"round {round_}: {wall:.1f}s wall")
        for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<22} {seconds:8.1f}s  {seconds / wall:6.1%}")
    print(f"orchestration share, worst round: {worst:.2%} (target <= 2%)")


if __name__ == "__main__":
    main()
