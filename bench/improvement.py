"""Does the loop improve the model? The verifiable-instruction loops, side by side.

    .venv/bin/python bench/improvement.py [--seeds 0 1] [--loops function selfjudge]
        [--rounds 3] [--set key=value ...] [--out results.jsonl] [--dir D [--collect]]

- function:  data/configs/verifiable.yaml, Self-Rewarding candidates scored by the
  checkers (the `function` judge), best vs worst -> DPO;
- selfjudge: data/configs/verifiable_selfjudge.yaml, the same prompts judged by the
  model's own LLM judge;
- checklist: data/configs/verifiable_checklist.yaml, Self-Rewarding judged by the model
  one requirement of the request at a time (yes/no), no outside judge;
- rlcd: data/configs/verifiable_rlcd.yaml, contrastive descriptors opening the
  assistant's turn (follow every instruction / ignore them), labels by construction;
- cai: data/configs/verifiable_cai.yaml, critique and revision against
  instruction-following principles, SFT on revisions then DPO revision over original;
- combined: data/configs/verifiable_combined.yaml, the three methods in one round;
- grpo: data/configs/verifiable_grpo.yaml, no pairs: GRPO on the same draw of prompts
  with the checkers as its online reward.

Each (loop, seed) is a real `prefloop run` in its own database. The yardstick is the
same for every loop: held-out strict prompt-level instruction-following accuracy of
M_0..M_T, greedy, with 95% Wilson intervals, on the seen split (the training pool's
wording) and on the unseen one (topics, request forms and phrasings never trained on).
Printed per round for the seen split: accuracy and interval, the change against M_0,
pairs, training time, the held-out answers' mean length and share cut off at max_tokens,
the pairs' chosen/rejected length, and how the checkers see the pairs (chosen better /
tied / worse: the self-judging loop's judge against the code), the share of held-out
answers that mention their topic and the share that do and follow every instruction (the
checks look at form only: a model can gain on them by dropping the request for the
format, and these two show it); then whether M_T beats M_0 with intervals that do not
overlap, and instruction-level strict accuracy per kind of instruction and model; then
each other split per model, strict and strict + on topic with intervals, and its M_T
against M_0. `--set` overrides apply to every run (the settings being tuned), and
`--out` appends one JSON line per run with its settings and results, so every setting
tried is kept with what it gave. `--collect` runs nothing and reads the finished runs in
`--dir`. The same call again with the same `--dir` and a larger `--rounds` continues
those runs (`prefloop run` resumes a run by name): the rounds already done are not rerun,
and the row's `wall_s` is the added rounds only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluation.yardstick import (  # noqa: E402
    INSTRUCTION_STRICT,
    ON_TOPIC,
    PROMPT_STRICT,
    STRICT_ON_TOPIC,
    split_metric,
    yardstick_splits,
)
from pipeline.store import Store  # noqa: E402

CONFIGS = ROOT / "data" / "configs"
LOOPS = {
    "function": CONFIGS / "verifiable.yaml",
    "selfjudge": CONFIGS / "verifiable_selfjudge.yaml",
    "checklist": CONFIGS / "verifiable_checklist.yaml",
    "rlcd": CONFIGS / "verifiable_rlcd.yaml",
    "cai": CONFIGS / "verifiable_cai.yaml",
    "combined": CONFIGS / "verifiable_combined.yaml",
    "grpo": CONFIGS / "verifiable_grpo.yaml",
}
VERDICTS = ("better", "tied", "worse")
METRIC = PROMPT_STRICT


def run_loop(config: Path, name: str, seed: int, rounds: int, sets: list[str], tmp: Path):
    db = tmp / f"{name}.duckdb"
    args = ["--set", f"name={name}", "--set", f"seed={seed}", "--set", f"db_path={db}"]
    args += ["--set", f"runs_dir={tmp / 'runs'}", "--rounds", str(rounds)]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "prefloop"), "run", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"},
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{name}: prefloop run failed:\n{out.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "rounds": collect(db, name)}


def checker_verdicts(store: Store, name: str, rounds: list[int]) -> dict[int, dict[str, Any]]:
    """Per round, how the checkers (the function judge's score) see each pair: chosen
    better, tied or worse, in all and per method (`by_method`). The function-judged loop
    agrees by construction; for every other method this is how often its labels were
    right: the direct measure of its label quality."""
    from pipeline.verifiable.judge import score

    verdicts: dict[int, dict[str, Any]] = {}
    for t in rounds:
        for r in store.evaluation_pairs(name, t):
            chosen, rejected = score(r["prompt"], r["chosen"]), score(r["prompt"], r["rejected"])
            if chosen is None or rejected is None:
                continue
            kind = "better" if chosen > rejected else "tied" if chosen == rejected else "worse"
            counts = verdicts.setdefault(t, {"better": 0, "tied": 0, "worse": 0, "by_method": {}})
            counts[kind] += 1
            method = counts["by_method"].setdefault(r["method"], dict.fromkeys(VERDICTS, 0))
            method[kind] += 1
    return verdicts


def split_numbers(evals: list[dict], split: str) -> dict[int, dict]:
    """Per round, a yardstick split's strict accuracy and strict + on topic, with
    intervals, and its instruction-level strict accuracy per kind of instruction."""
    out: dict[int, dict] = {}
    for metric, key in ((PROMPT_STRICT, "accuracy"), (STRICT_ON_TOPIC, "strict_on_topic")):
        for e in evals:
            if e["metric"] == split_metric(metric, split):
                d = json.loads(e["details_json"])
                cell = out.setdefault(e["round"], {"n": d["n"]})
                cell.update({key: e["value"], f"{key}_ci95": d["ci95"]})
    for e in evals:
        if e["metric"] == split_metric(INSTRUCTION_STRICT, split) and e["round"] in out:
            out[e["round"]]["per_kind"] = json.loads(e["details_json"]).get("per_kind")
    return out


def collect(db: Path, name: str) -> dict[int, dict]:
    """A finished run's numbers per round, read from its database."""
    with Store(db, read_only=True) as store:
        all_evals = store.evaluations(name)
        evals = [e for e in all_evals if e["metric"] == METRIC]
        kinds = {
            e["round"]: json.loads(e["details_json"]).get("per_kind")
            for e in all_evals
            if e["metric"] == INSTRUCTION_STRICT
        }
        topical = {
            (e["round"], e["metric"]): (e["value"], json.loads(e["details_json"]).get("ci95"))
            for e in all_evals
            if e["metric"] in (ON_TOPIC, STRICT_ON_TOPIC)
        }
        stages = store.report_data(name)["stages"]
        rounds_run = sorted({s["round"] for s in stages})
        pairs = {t: sum(store.pair_counts(name, t).values()) for t in rounds_run}
        train: dict[int, float] = {}
        for s in stages:
            if s["stage"].startswith("train_"):
                train[s["round"]] = train.get(s["round"], 0.0) + s["wall_s"]
        lengths = store.answer_lengths(name)
        verdicts = checker_verdicts(store, name, rounds_run)
    others = {s: split_numbers(all_evals, s) for s in yardstick_splits(all_evals)}
    per_round = {}
    for e in evals:
        d, t = json.loads(e["details_json"]), e["round"]
        length = lengths.get(t, {})
        on_topic, _ = topical.get((t, ON_TOPIC), (None, None))
        both, both_ci = topical.get((t, STRICT_ON_TOPIC), (None, None))
        per_round[t] = {
            "accuracy": e["value"],
            "ci95": d["ci95"],
            "n": d["n"],
            "pairs": pairs.get(t),
            "train_s": train.get(t),
            "answer_tokens": length.get("tokens"),
            "answers_cut": length.get("cut"),
            "chosen_tokens": length.get("chosen"),
            "rejected_tokens": length.get("rejected"),
            "checkers": verdicts.get(t),
            "per_kind": kinds.get(t),
            "on_topic": on_topic,
            "strict_on_topic": both,
            "strict_on_topic_ci95": both_ci,
            "splits": {s: numbers[t] for s, numbers in others.items() if t in numbers},
        }
    return dict(sorted(per_round.items()))


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _verdicts(counts: dict | None) -> str:
    return "-" if not counts else f"{counts['better']}/{counts['tied']}/{counts['worse']}"


def show(loop: str, seed: int, result: dict) -> None:
    rounds = {int(t): r for t, r in result["rounds"].items()}
    base = rounds[0]["accuracy"]
    wall = result.get("wall_s")
    took = f"{wall / 60:.1f} min" if wall else "read from its database"
    print(f"\n{loop}, seed {seed} ({took})")
    print(
        f"   {'model':<6} {'strict prompt acc':>17} {'95% interval':>16} {'vs M_0':>8} "
        f"{'pairs':>6} {'train s':>8} {'answer tok':>10} {'cut off':>8} {'chosen/rej tok':>15} "
        f"{'checkers +/=/-':>15} {'on topic':>8} {'strict+topic':>12}"
    )
    for t, r in rounds.items():
        lo, hi = r["ci95"]
        lengths = f"{_num(r.get('chosen_tokens'), '.0f')}/{_num(r.get('rejected_tokens'), '.0f')}"
        print(
            f"   M_{t:<4} {r['accuracy']:>17.3f} {f'[{lo:.3f}, {hi:.3f}]':>16} "
            f"{100 * (r['accuracy'] - base):>+7.1f}pt {_num(r['pairs'], 'd'):>6} "
            f"{_num(r['train_s'], '.0f'):>8} {_num(r.get('answer_tokens'), '.0f'):>10} "
            f"{_num(r.get('answers_cut'), '.0%'):>8} {lengths if t else '-':>15} "
            f"{_verdicts(r.get('checkers')):>15} {_num(r.get('on_topic'), '.3f'):>8} "
            f"{_num(r.get('strict_on_topic'), '.3f'):>12}"
        )
    for t, r in rounds.items():
        by_method = (r.get("checkers") or {}).get("by_method") or {}
        if len(by_method) > 1:
            shown = ", ".join(f"{m} {_verdicts(c)}" for m, c in sorted(by_method.items()))
            print(f"   M_{t} pairs by method, checkers +/=/-: {shown}")
    first, last = rounds[0], rounds[max(rounds)]
    gain = 100 * (last["accuracy"] - base)
    print(
        f"   M_{max(rounds)} - M_0: {gain:+.1f} points; "
        f"intervals {_apart(first['ci95'], last['ci95'])}"
    )
    if first.get("strict_on_topic") is not None and last.get("strict_on_topic") is not None:
        both = (first.get("strict_on_topic_ci95"), last.get("strict_on_topic_ci95"))
        apart = f"; intervals {_apart(*both)}" if None not in both else ""
        print(
            f"   strict and on topic: M_0 {first['strict_on_topic']:.3f} -> "
            f"M_{max(rounds)} {last['strict_on_topic']:.3f} "
            f"({100 * (last['strict_on_topic'] - first['strict_on_topic']):+.1f} points{apart})"
        )
    show_splits(rounds)
    show_kinds(rounds)


def show_splits(rounds: dict[int, dict]) -> None:
    """Each yardstick split beyond the seen one: per model its strict accuracy, and
    strict + on topic, with intervals; then M_T against M_0."""
    names = sorted({s for r in rounds.values() for s in r.get("splits") or {}})
    for split in names:
        cells = {t: r["splits"][split] for t, r in rounds.items() if split in r.get("splits", {})}
        print(f"   {split} split ({max(c['n'] for c in cells.values())} prompts):")
        for t, c in cells.items():
            lo, hi = c["accuracy_ci95"]
            both = c.get("strict_on_topic")
            print(
                f"     M_{t:<4} strict {c['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
                f"   strict+topic {_num(both, '.3f')}"
            )
        first, last = cells[min(cells)], cells[max(cells)]
        print(
            f"     M_{max(cells)} - M_{min(cells)}: "
            f"{100 * (last['accuracy'] - first['accuracy']):+.1f} points; intervals "
            f"{_apart(first['accuracy_ci95'], last['accuracy_ci95'])}"
        )
        show_kinds(cells, f"{split} by instruction")


def _apart(first: list[float], last: list[float]) -> str:
    """Whether the last model's 95% interval clears the first one's, and which way."""
    if last[0] > first[1]:
        return "do not overlap (better)"
    if last[1] < first[0]:
        return "do not overlap (worse)"
    return "overlap"


def show_kinds(rounds: dict[int, dict], title: str = "by instruction (strict)") -> None:
    """Instruction-level strict accuracy per kind of instruction and model: where a
    round's gain or loss came from."""
    per_kind = {t: r.get("per_kind") or {} for t, r in rounds.items()}
    kinds = sorted({k for counts in per_kind.values() for k in counts})
    if not kinds:
        return
    print(f"   {title:<24} {'n':>4}" + "".join(f"{f'M_{t}':>7}" for t in rounds))
    for k in kinds:
        n = max(counts.get(k, (0, 0))[1] for counts in per_kind.values())
        cells = []
        for counts in per_kind.values():
            followed, total = counts.get(k, (0, 0))
            cells.append(f"{followed / total:>7.2f}" if total else f"{'-':>7}")
        print(f"   {k:<24} {n:>4}" + "".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dir", type=Path, default=None, help="keep the runs here (default: temp)")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: print (and --out) the finished runs already in --dir",
    )
    args = ap.parse_args()
    if args.collect:
        if args.dir is None:
            raise SystemExit("--collect reads the runs in --dir; give it")
        for loop in args.loops:
            for seed in args.seeds:
                name = f"improve-{loop}-s{seed}"
                db = args.dir / f"{name}.duckdb"
                if db.exists():
                    record = {"loop": loop, "seed": seed, "settings": args.sets, "wall_s": None}
                    record["rounds"] = collect(db, name)
                    show(loop, seed, record)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(record) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.dir is not None:
            args.dir.mkdir(parents=True, exist_ok=True)
            tmp = args.dir
        for loop in args.loops:
            for seed in args.seeds:
                name = f"improve-{loop}-s{seed}"
                result = run_loop(LOOPS[loop], name, seed, args.rounds, args.sets, Path(tmp))
                show(loop, seed, result)
                sys.stdout.flush()
                if args.out:
                    with open(args.out, "a") as f:
                        record = {"loop": loop, "seed": seed, "settings": args.sets, **result}
                        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
