"""Judge benchmark, side by side in one process, printed as ratios.

    .venv/bin/python bench/judges.py [--model smollm2-135m-instruct] [--texts 96]

1. Reward-model scoring through prefloop (the `reward_model` judge on its `RewardScorer`)
   vs a plain batched transformers forward loop on the same texts and batch size: a
   SmolLM2-135M sequence-classification model (its score head is random: the speed, not
   the scores, is measured). Target >= 0.95.
2. Re-judging a stored round (`rejudge_round`, the prefilled 0-5 judge on the round's
   model) vs running the round again with that judge: wall time of each, and the ratio.
The two paths alternate; every figure is the median of the repeats.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# No network: Prefect's server would send telemetry otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pipeline.engines import start_engine  # noqa: E402
from pipeline.engines.scorer import RewardScorer  # noqa: E402
from pipeline.judging import JUDGES, JudgeItem, build_judge  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.paths import DATA_DIR  # noqa: E402
from pipeline.schema import EngineConfig  # noqa: E402
from pipeline.seeds import load_prompts  # noqa: E402


def make_reward_model(base: Path, out: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def texts(n: int) -> list[JudgeItem]:
    """Prompts from the shipped files with answers of varied length (8..200 words)."""
    prompts = load_prompts(DATA_DIR / "prompts" / "helpful.jsonl")
    words = " ".join(p.text for p in prompts).split()
    items = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        length = 8 + (i * 37) % 193
        answer = " ".join(words[(i * 13 + k) % len(words)] for k in range(length))
        items.append(JudgeItem(p.text, answer, p.conversation))
    return items


def bench_reward_model(model_dir: Path, items: list[JudgeItem], batch: int, repeats: int) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = EngineConfig(kind="hf", batch_size=batch, max_model_len=2048)
    scorer = RewardScorer.start(model_dir, cfg, seed=0)
    settings = JUDGES["reward_model"].config(model=str(model_dir))
    judge = build_judge(settings, {"fallback": None}, scorer, "bench-rm")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plain_model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    conversations = [
        [*it.conversation, {"role": "assistant", "content": it.response}] for it in items
    ]

    def ours() -> list[float]:
        return [s[0].score for s in judge.score(items)]

    def plain() -> list[float]:
        # What a user would write: tokenize with the chat template, pad each batch, forward.
        out = []
        for start in range(0, len(conversations), batch):
            enc = tokenizer.apply_chat_template(
                conversations[start : start + batch],
                tokenize=True,
                padding=True,
                return_dict=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                out += plain_model(**enc).logits[:, 0].tolist()
        return out

    def plain_sorted() -> list[float]:
        # The same loop over texts sorted by length (less padding), as prefloop batches.
        order = sorted(range(len(conversations)), key=lambda i: -len(str(conversations[i])))
        out = [0.0] * len(order)
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            enc = tokenizer.apply_chat_template(
                [conversations[i] for i in chunk],
                tokenize=True,
                padding=True,
                return_dict=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                for i, v in zip(chunk, plain_model(**enc).logits[:, 0].tolist(), strict=True):
                    out[i] = v
        return out

    tokens = sum(len(scorer.encode_conversation(c)) for c in conversations)
    ours(), plain(), plain_sorted()  # warm-up
    paths = [
        ("prefloop reward_model judge", ours),
        ("plain transformers", plain),
        ("plain, sorted by length", plain_sorted),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for r in range(repeats):
        for name, fn in paths if r % 2 == 0 else paths[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for a, b in zip(ours(), plain(), strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n1. reward-model scoring: {len(items)} texts, {tokens} tokens, batch {batch}")
    for name, seconds in med.items():
        print(f"   {name:<30} {seconds:7.2f} s  {tokens / seconds:8.0f} tok/s")
    ours_s = med["prefloop reward_model judge"]
    print(f"   throughput ratio prefloop / plain: {med['plain transformers'] / ours_s:.3f}")
    sorted_ratio = med["plain, sorted by length"] / ours_s
    print(f"   throughput ratio prefloop / plain sorted: {sorted_ratio:.3f} (target >= 0.95)")
    print(f"   largest score difference between the two: {diff:.2e}")
    scorer.close()


def bench_rejudge(model: str, prompts: int, repeats: int) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.loop import loop_flow
    from pipeline.config import parse_config
    from pipeline.rejudge import rejudge_round
    from pipeline.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-judges-"))
    base = {
        "db_path": str(tmp / "db.duckdb"),
        "runs_dir": str(tmp / "runs"),
        "model": model,
        "rounds": 1,
        "engine": {"kind": "hf", "batch_size": 8, "max_model_len": 2048},
        "prompts": {"files": [str(DATA_DIR / "prompts" / "helpful.jsonl")], "per_round": prompts},
        "self_reward": {
            "n_candidates": 4,
            "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64},
            "judge": {"kind": "function", "function": "bench.judges:answer_words"},
            "self_instruct": {"enabled": False},
        },
        "rlcd": {"enabled": False},
        "cai": {"enabled": False},
        "training": {"steps": []},
        "evaluation": {"enabled": False},
    }
    new_judge = {"kind": "template", "template": "judge_additive_5pt_prefilled"}
    times: dict[str, list[float]] = {"re-judge stored round": [], "round again": []}
    with prefect_test_harness(server_startup_timeout=120):
        loop_flow({**base, "name": "stored"})
        cfg = parse_config({**base, "name": "stored"})
        for r in range(repeats):

            def rejudge(r=r):
                with Store(cfg.db_path) as store:
                    store.con.execute(  # judge afresh each repeat
                        "DELETE FROM judgments WHERE judge_id LIKE 'judge_additive_5pt_prefilled%'"
                    ).fetchall()
                    result = rejudge_round(
                        store,
                        cfg,
                        "stored",
                        1,
                        JUDGES["template"].config(**new_judge),
                        lambda path, role: start_engine(Path(path), cfg.engine, cfg.seed + 1),
                    )
                assert result.added > 0

            def again(r=r):
                sr = {**base["self_reward"], "judge": new_judge}
                loop_flow({**base, "name": f"again-{r}", "self_reward": sr})

            pair = [("re-judge stored round", rejudge), ("round again", again)]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n2. a new judge on a stored round ({prompts} prompts x 4 candidates, hf engine)")
    for name, seconds in med.items():
        runs = json.dumps([round(t, 1) for t in times[name]])
        print(f"   {name:<30} {seconds:7.1f} s  (runs: {runs})")
    ratio = med["round again"] / med["re-judge stored round"]
    print(f"   wall-time ratio round again / re-judge: {ratio:.1f}x")


def answer_words(prompt: str, answer: str) -> float:
    """The stored round's own judge in the bench: a rule (fast), so the round's time is
    the generation's."""
    return float(len(answer.split()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--texts", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-rejudge", action="store_true")
    args = ap.parse_args()
    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        rm = make_reward_model(model.path, Path(tmp) / "rm")
        bench_reward_model(rm, texts(args.texts), args.batch, args.repeats)
    if not args.skip_rejudge:
        bench_rejudge(str(model.path), args.prompts, args.repeats)


if __name__ == "__main__":
    main()
