"""Store benchmark: ingest and the README's recipe queries at 1,000,000 pairs.

    .venv/bin/python bench/store.py [--pairs 1000000] [--row-by-row 20000]

1. Ingest: the pairs table (and, around it, 2 generations per pair, prompts, judgments,
   comparisons and discards) through `Store.write` (Arrow batches, `ON CONFLICT DO
   NOTHING`, one transaction) vs the same rows inserted one statement per row;
2. every SQL recipe in the README, timed on the 1M-pair database (best of 3).
Targets: ingest >= 500,000 rows/s; each recipe < 0.5 s.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.recipes import sql_recipes  # noqa: E402
from pipeline.store import Store  # noqa: E402

RUN = "bench"
METHODS = ("self_reward", "rlcd", "cai")
WORDS = ("the", "a", "model", "answer", "helpful", "harmless", "explain", "why", "judge")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def synthetic(n_pairs: int, seed: int = 0) -> dict[str, pa.Table]:
    """A run's worth of rows shaped like real ones: 10 pairs per prompt, 5 rounds."""
    rng = random.Random(seed)
    n_prompts = max(n_pairs // 10, 1)
    texts = [_text(rng, 24) for _ in range(1000)]  # reused: generating 2M texts is not the point
    prompts = pa.table(
        {
            "run_id": [RUN] * n_prompts,
            "prompt_id": [f"p{i:031x}" for i in range(n_prompts)],
            "round": [1 + i % 5 for i in range(n_prompts)],
            "source": ["seed"] * n_prompts,
            "split": ["train"] * n_prompts,
            "text": [texts[i % 1000][:80] for i in range(n_prompts)],
            "messages_json": [json.dumps([{"role": "user", "content": "q"}])] * n_prompts,
        }
    )
    n_gen = 2 * n_pairs
    generations = pa.table(
        {
            "generation_id": [f"g{i:031x}" for i in range(n_gen)],
            "run_id": [RUN] * n_gen,
            "round": [1 + (i // 2) % 5 for i in range(n_gen)],
            "method": [METHODS[(i // 2) % 3] for i in range(n_gen)],
            "prompt_id": [f"p{(i // 20) % n_prompts:031x}" for i in range(n_gen)],
            "model_id": ["m"] * n_gen,
            "role": ["candidate"] * n_gen,
            "sample_idx": [i % 2 for i in range(n_gen)],
            "text": [texts[i % 1000] for i in range(n_gen)],
            "n_tokens": [32] * n_gen,
            "finish_reason": ["stop"] * n_gen,
            "sampling_json": ["{}"] * n_gen,
            "seed": [0] * n_gen,
        }
    )
    pairs = pa.table(
        {
            "pair_id": [f"{i:032x}" for i in range(n_pairs)],
            "run_id": [RUN] * n_pairs,
            "round": [1 + i % 5 for i in range(n_pairs)],
            "method": [METHODS[i % 3] for i in range(n_pairs)],
            "variant": ["v"] * n_pairs,
            "prompt_id": [f"p{(i // 10) % n_prompts:031x}" for i in range(n_pairs)],
            "chosen_generation_id": [f"g{2 * i:031x}" for i in range(n_pairs)],
            "rejected_generation_id": [f"g{2 * i + 1:031x}" for i in range(n_pairs)],
            "chosen_score": [rng.random() * 5 for _ in range(n_pairs)],
            "rejected_score": [rng.random() * 5 for _ in range(n_pairs)],
            "margin": [rng.random() for _ in range(n_pairs)],
            "soft_label": [rng.random() for _ in range(n_pairs)],
            "flagged": [i % 50 == 0 for i in range(n_pairs)],
            "model_id": ["m"] * n_pairs,
        }
    )
    n_j = n_pairs
    judgments = pa.table(
        {
            "judgment_id": [f"j{i:031x}" for i in range(n_j)],
            "run_id": [RUN] * n_j,
            "round": [1 + i % 5 for i in range(n_j)],
            "method": ["self_reward"] * n_j,
            "generation_id": [f"g{i:031x}" for i in range(n_j)],
            "sample_idx": [0] * n_j,
            "model_id": ["m"] * n_j,
            "template_id": ["judge@1"] * n_j,
            "raw_output": ["Score: 4"] * n_j,
            "score": [None if i % 20 == 0 else float(i % 6) for i in range(n_j)],
            "parse_status": ["ok"] * n_j,
            "sampling_json": ["{}"] * n_j,
            "seed": [0] * n_j,
        }
    )
    n_c = n_pairs // 10
    comparisons = pa.table(
        {
            "comparison_id": [f"c{i:031x}" for i in range(n_c)],
            "run_id": [RUN] * n_c,
            "round": [1 + i % 5 for i in range(n_c)],
            "method": ["evaluation"] * n_c,
            "prompt_id": [f"p{i % n_prompts:031x}" for i in range(n_c)],
            "generation_a_id": [f"g{2 * i:031x}" for i in range(n_c)],
            "generation_b_id": [f"g{2 * i + 1:031x}" for i in range(n_c)],
            "model_id": ["m"] * n_c,
            "template_id": ["judge_pairwise@1"] * n_c,
            "prob_a": [rng.random() for _ in range(n_c)],
            "meta_json": [
                json.dumps({"purpose": "win_rate", "order": ("new_first", "old_first")[i % 2]})
                for i in range(n_c)
            ],
        }
    )
    discards = pa.table(
        {
            "run_id": [RUN] * n_c,
            "round": [1 + i % 5 for i in range(n_c)],
            "method": [METHODS[i % 3] for i in range(n_c)],
            "stage": ["pairs"] * n_c,
            "item_id": [f"p{i:031x}" for i in range(n_c)],
            "reason": [("tie", "identical", "empty")[i % 3] for i in range(n_c)],
        }
    )
    stage_metrics = pa.table(
        {
            "run_id": [RUN] * 50,
            "round": [1 + i % 5 for i in range(50)],
            "stage": [METHODS[i % 3] for i in range(50)],
            "batch": list(range(50)),
            "n_items": [256] * 50,
            "wall_s": [10.0] * 50,
            "prompt_tokens": [10000] * 50,
            "completion_tokens": [5000] * 50,
            "tokens_per_s": [1500.0] * 50,
            "setup_s": [0.0] * 50,
        }
    )
    evaluations = pa.table(
        {
            "evaluation_id": [f"e{i}" for i in range(40)],
            "run_id": [RUN] * 40,
            "round": [1 + i % 5 for i in range(40)],
            "metric": [("win_rate", "length_ratio")[i % 2] for i in range(40)],
            "method": [None if i % 2 == 0 else "rlcd" for i in range(40)],
            "value": [0.5] * 40,
            "details_json": ["{}"] * 40,
        }
    )
    return {
        "prompts": prompts,
        "generations": generations,
        "judgments": judgments,
        "comparisons": comparisons,
        "discards": discards,
        "stage_metrics": stage_metrics,
        "evaluations": evaluations,
        "pairs": pairs,
    }


def row_by_row(store: Store, table: pa.Table, name: str) -> float:
    """Seconds to insert `table` one INSERT statement per row (in one transaction)."""
    columns = table.column_names
    sql = f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    rows = table.to_pylist()
    start = time.perf_counter()
    with store.transaction():
        for row in rows:
            store.con.execute(sql, [row[c] for c in columns]).fetchall()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--row-by-row", type=int, default=20_000, help="rows for the slow path")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    start = time.perf_counter()
    tables = synthetic(args.pairs)
    print(f"synthetic rows built in {time.perf_counter() - start:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "bench.duckdb") as store:
            # The pairs first, into a new file; then the other tables (their generations
            # and prompts the recipes join with), into the same file.
            pairs = tables.pop("pairs")
            start = time.perf_counter()
            store.write({"pairs": pairs})
            arrow_s = time.perf_counter() - start
            start = time.perf_counter()
            store.write(tables)
            others = time.perf_counter() - start
            n_others = sum(t.num_rows for t in tables.values())
            # The same rows again: the resume path (every id exists, nothing inserted).
            start = time.perf_counter()
            again = store.write({"pairs": pairs})
            resume_s = time.perf_counter() - start
            assert again.get("pairs", 0) == 0

        with Store(Path(tmp) / "rows.duckdb") as slow:
            sample = pairs.slice(0, args.row_by_row)
            rbr_s = row_by_row(slow, sample, "pairs")

        arrow_rate = pairs.num_rows / arrow_s
        rbr_rate = sample.num_rows / rbr_s
        print(f"\ningest ({args.pairs:,} pairs)")
        print(f"  pairs via Arrow batch     {arrow_rate:12,.0f} rows/s  ({arrow_s:.2f}s)")
        print(
            f"  other tables via Arrow    {n_others / others:12,.0f} rows/s  "
            f"({n_others:,} rows, {others:.2f}s)"
        )
        print(
            f"  pairs again (all exist)   {pairs.num_rows / resume_s:12,.0f} rows/s  (0 inserted)"
        )
        print(f"  pairs row by row          {rbr_rate:12,.0f} rows/s  ({sample.num_rows:,} rows)")
        print(f"  ratio arrow / row-by-row  {arrow_rate / rbr_rate:8.0f}x")
        print(f"  target >= 500,000 rows/s: {'met' if arrow_rate >= 500_000 else 'MISSED'}")

        print(f"\nSQL recipes on {args.pairs:,} pairs (best of {args.repeats})")
        worst = 0.0
        with Store(Path(tmp) / "bench.duckdb", read_only=True) as store:
            for name, statement in sql_recipes():
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    store.sql(statement)
                    best = min(best, time.perf_counter() - start)
                worst = max(worst, best)
                print(f"  {best * 1000:8.1f} ms  {name[:70]}")
        verdict = "met" if worst < 0.5 else "MISSED"
        print(f"  slowest {worst * 1000:.1f} ms; target < 500 ms: {verdict}")


if __name__ == "__main__":
    main()
