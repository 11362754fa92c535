"""The report's pairs explorer at size: the page's bytes and the time headless Chromium
takes to load it and run its script, for a run of N pairs (real rows in a DuckDB file,
written as a round writes them), against the same page without the explorer section.

    .venv/bin/python bench/explorer.py [--pairs 30 10000] [--repeats 3] [--out FILE]

Prints, per size: pairs carried by the page (a sample past pipeline.explorer.MAX_PAIRS),
page size with and without the explorer, and Chromium's load time for each (median of
the repeats), with their ratio; `--out` appends each size's numbers as a JSON line.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import report  # noqa: E402
from pipeline.hashing import row_id  # noqa: E402
from pipeline.store import Store  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ANSWER = "A careful answer with a few sentences of detail about the request. " * 4


def fill(store: Store, n: int) -> None:
    """A finished round of `n` pairs over three methods, with a judgment per candidate,
    a critique per CAI pair and a discard per ten pairs."""
    run, methods = "bench", ("self_reward", "rlcd", "cai")
    rows: dict[str, list] = {k: [] for k in ("prompts", "generations", "pairs", "judgments")}
    rows["critiques"], rows["discards"] = [], []
    for i in range(n):
        pid, method = row_id("p", i), methods[i % 3]
        rows["prompts"].append(
            {"run_id": run, "prompt_id": pid, "round": 1, "source": "seed", "text": f"Request {i}?",
             "messages_json": json.dumps([{"role": "user", "content": f"Request {i}?"}])}
        )  # fmt: skip
        gids = [row_id("g", i, k) for k in range(2)]
        for k, gid in enumerate(gids):
            rows["generations"].append(
                {"generation_id": gid, "run_id": run, "round": 1, "method": method,
                 "prompt_id": pid, "model_id": "m@0", "role": "candidate", "sample_idx": k,
                 "text": f"{ANSWER}{'Longer. ' * k}{i}", "n_tokens": 60 + k,
                 "finish_reason": "stop", "sampling_json": "{}", "seed": 0}
            )  # fmt: skip
            rows["judgments"].append(
                {"judgment_id": row_id("j", gid), "run_id": run, "round": 1, "method": method,
                 "generation_id": gid, "sample_idx": 0, "model_id": "m@0", "judge_id": "judge@1",
                 "template_id": "judge@1", "raw_output": "Score: 4", "score": 4.0 - k,
                 "parse_status": "ok", "sampling_json": "{}", "seed": 0}
            )  # fmt: skip
        rows["pairs"].append(
            {"pair_id": row_id("pair", i), "run_id": run, "round": 1, "method": method,
             "variant": "bench", "prompt_id": pid, "chosen_generation_id": gids[0],
             "rejected_generation_id": gids[1], "margin": 1.0, "model_id": "m@0"}
        )  # fmt: skip
        if method == "cai":
            rows["critiques"].append(
                {"critique_id": row_id("c", i), "run_id": run, "round": 1, "prompt_id": pid,
                 "step": 0, "principle_id": "harm", "input_generation_id": gids[1],
                 "critique": "It could say more.", "revision_generation_id": gids[0],
                 "model_id": "m@0", "template_id": "t@1"}
            )  # fmt: skip
        if i % 10 == 0:
            rows["discards"].append(
                {"run_id": run, "round": 1, "method": method, "stage": "pairs", "item_id": pid,
                 "reason": "tie", "detail": None}
            )  # fmt: skip
    rows["rounds"] = [{"run_id": run, "round": 1, "model_id": "m@0", "status": "finished"}]
    store.write(rows)


def load_time(chromium: str, page: Path, tmp: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return time.perf_counter() - start


def measure(n: int, repeats: int, chromium: str, tmp: Path) -> dict:
    db = tmp / f"{n}.duckdb"
    with Store(db) as store:
        fill(store, n)
    with_it = report.write_report(db, "bench", tmp / f"{n}.html")
    original = report.explorer_section
    report.explorer_section = lambda store, run_id: None  # the page without the explorer
    try:
        without = report.write_report(db, "bench", tmp / f"{n}-without.html")
    finally:
        report.explorer_section = original
    times = {}
    for name, page in (("with", with_it), ("without", without)):
        runs = [load_time(chromium, page, tmp / f"ud-{name}-{r}") for r in range(repeats)]
        times[name] = statistics.median(runs)
    carried = len(json.loads(_data(with_it))["pairs"])
    kib = {name: p.stat().st_size / 1024 for name, p in (("with", with_it), ("without", without))}
    print(
        f"{n:>6} pairs (page carries {carried}): {kib['with']:8.0f} KiB vs {kib['without']:6.0f} "
        f"KiB without the explorer; Chromium load {times['with']:.2f} s vs "
        f"{times['without']:.2f} s: {times['with'] / times['without']:.2f}x"
    )
    return {"pairs": n, "carried": carried, "kib": kib, "load_s": times, "repeats": repeats}


def _data(page: Path) -> str:
    text = page.read_text()
    start = text.index('<script type="application/json" id="pairs-data">') + 48
    return text[start : text.index("</script>", start)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[30, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="append each size's numbers as a JSON line")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or sys.exit(
        "needs Debian's chromium (make test installs it)"
    )
    with tempfile.TemporaryDirectory(prefix="prefloop-explorer-") as tmp:
        for n in args.pairs:
            result = measure(n, args.repeats, chromium, Path(tmp))
            if args.out:
                stamp = time.strftime("%Y-%m-%d")
                with open(args.out, "a") as f:
                    f.write(json.dumps({"date": stamp, **result}) + "\n")


if __name__ == "__main__":
    main()
