"""Round wall time with readers and without, and with the store's connection handling
now (opened per write and read) against before (one connection held for the round).

    .venv/bin/python bench/readers.py [--model smollm2-135m-instruct] [--repeats 2]

Each variant runs the same one-round loop (Self-Rewarding and RLCD on transformers, no
training) into a fresh database; the variants alternate. Readers: a second process opens
the database read-only every second and counts rows, as `prefloop status` or a
notebook would. Before, a reader could not open the file at all while the round ran, so
the "held" variant has no readers; it is the old handling's cost, for the ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# No network: Prefect's server would send telemetry otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pipeline.paths import DATA_DIR  # noqa: E402

POLLER = """
import sys, time
from pipeline.errors import StoreError
from pipeline.store import Store
answered = missed = 0
while True:
    try:
        with Store(sys.argv[1], read_only=True, lock_timeout_s=5) as s:
            s.sql("SELECT count(*) FROM generations"); s.sql("SELECT count(*) FROM pairs")
        answered += 1
    except StoreError:
        missed += 1
    print(answered, missed, flush=True)
    time.sleep(1.0)
"""


def config(tmp: Path, model: str, name: str) -> dict:
    return {
        "name": name,
        "db_path": str(tmp / f"{name}.duckdb"),
        "runs_dir": str(tmp / "runs"),
        "model": model,
        "rounds": 1,
        "engine": {"kind": "hf", "batch_size": 2},
        "prompts": {"files": [str(DATA_DIR / "prompts" / "helpful.jsonl")], "per_round": 8},
        "self_reward": {
            "n_candidates": 4,
            "sampling": {"temperature": 0.7, "max_tokens": 48},
            "judge": {"kind": "template", "template": "judge_additive_5pt_prefilled"},
            "self_instruct": {"enabled": False},
        },
        "rlcd": {"tasks": ["helpfulness"], "sampling": {"max_tokens": 48}},
        "cai": {"enabled": False},
        "training": {"steps": []},
        "evaluation": {"enabled": False},
    }


def hold_for_the_round():
    """The old handling: the round's store keeps one connection from the round's start to
    its end (`with r.store:` around the round). Returns a function that undoes it."""
    from flows.round import Round

    init, close = Round.__init__, Round.close

    def held_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.store.__enter__()

    def released_close(self):
        try:
            return close(self)
        finally:
            self.store.close()

    Round.__init__, Round.close = held_init, released_close

    def undo() -> None:
        Round.__init__, Round.close = init, close

    return undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.loop import loop_flow
    from pipeline.models import resolve_model

    model = str(resolve_model(args.model).path)
    tmp = Path(tempfile.mkdtemp(prefix="bench-readers-"))
    times: dict[str, list[float]] = {"per use, no readers": [], "per use, readers": [], "held": []}
    polls: list[tuple[int, int]] = []
    with prefect_test_harness(server_startup_timeout=120):
        loop_flow(config(tmp, model, "warmup"))
        for r in range(args.repeats):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for variant in order:
                cfg = config(tmp, model, f"{variant.replace(',', '').replace(' ', '-')}-{r}")
                poller = None
                undo = hold_for_the_round() if variant == "held" else (lambda: None)
                start = time.perf_counter()
                if variant == "per use, readers":
                    from pipeline.store import Store

                    Store(cfg["db_path"]).close()  # exists before the reader starts
                    poller = subprocess.Popen(
                        [sys.executable, "-c", POLLER, cfg["db_path"]],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                try:
                    loop_flow(cfg)
                finally:
                    undo()
                    if poller is not None:
                        poller.kill()
                        out = poller.communicate()[0].split()
                        polls.append((int(out[-2]), int(out[-1])) if len(out) >= 2 else (0, 0))
                times[variant].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nround wall time (median of runs), one round: 8 prompts, Self-Rewarding + RLCD, hf")
    for name, seconds in med.items():
        print(f"   {name:<22} {seconds:7.1f} s  runs {[round(t, 1) for t in times[name]]}")
    base = med["per use, no readers"]
    print(f"   readers polling every 1 s vs none:   {med['per use, readers'] / base:.3f}x")
    print(f"   per-use connections vs held (old):   {base / med['held']:.3f}x  (target < 1.02)")
    # The connection handling's own cost: the flow's store work per round (its `flow`
    # stage row), which generation noise does not blur.
    from pipeline.store import Store

    own: dict[str, list[float]] = {k: [] for k in times}
    for variant in times:
        for r in range(args.repeats):
            name = f"{variant.replace(',', '').replace(' ', '-')}-{r}"
            with Store(tmp / f"{name}.duckdb", read_only=True) as store:
                [(flow,)] = store.sql("SELECT sum(wall_s) FROM stage_metrics WHERE stage = 'flow'")[
                    1
                ]
            own[variant].append(flow)
    flow_med = {k: statistics.median(v) for k, v in own.items()}
    print("   the flow's own store work per round (stage_metrics 'flow'):")
    for name, seconds in flow_med.items():
        print(f"     {name:<22} {seconds:5.2f} s  ({100 * seconds / med[name]:.2f}% of the round)")
    extra = flow_med["per use, no readers"] - flow_med["held"]
    print(f"   per-use connections cost {extra:+.2f} s a round: {100 * extra / base:+.2f}% of it")
    answered = sum(a for a, _ in polls)
    missed = sum(m for _, m in polls)
    print(f"   reader queries answered: {answered} of {answered + missed}")


if __name__ == "__main__":
    main()
