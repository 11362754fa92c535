"""Training-step benchmark: a step through prefloop vs the same TRL trainer called
directly on the same data, side by side in one process, printed as ratios.

    .venv/bin/python bench/training.py [--model smollm2-135m-instruct] [--rows 32]
        [--kinds dpo sft grpo] [--grpo-steps 8] [--grpo-config data/configs/verifiable_grpo.yaml]

prefloop's step (`train_step`) snapshots the round's rows from DuckDB into the round's
folder, trains in a child process (a fresh Python that imports torch and TRL, loads the
model and the snapshot), saves, hashes the checkpoint and registers it. The direct path
is what a user's own script does in a warm process: load the same snapshot, build the
same trainer with the same settings, train, save. The difference is prefloop's overhead
per step; it is mostly the child's start (imports and model load), which buys a crash
that cannot take the flow down and memory that is all returned after the step.

For every kind the two paths alternate (a warm-up of the direct path first, so TRL's
imports are not counted against it); every figure is the median of the repeats.

GRPO: both paths sample answers to the same verifiable prompts in the trainer and reward
them with the same rule (`pipeline.verifiable.judge:score_on_topic`); prefloop's through
its function judge, recording every rollout and storing them with the step, the direct
path through a plain TRL reward function. Nothing is held out on either side. Both train
with the same seed, so their per-step rewards should agree; the bench prints both.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.hashing import row_id  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.paths import DATA_DIR  # noqa: E402
from pipeline.rounds import draw_rows  # noqa: E402
from pipeline.rows import RoundContext  # noqa: E402
from pipeline.schema import TrainingConfig  # noqa: E402
from pipeline.seeds import load_prompts  # noqa: E402
from pipeline.store import Store  # noqa: E402
from pipeline.training.step import train_step  # noqa: E402

RUN = "bench-train"
RESULTS = Path(__file__).resolve().parent / "results" / "training.jsonl"


def answer(words: list[str], i: int, length: int) -> str:
    return " ".join(words[(i * 13 + k) % len(words)] for k in range(length)).capitalize() + "."


def write_round(store: Store, model_dir: Path, n: int) -> None:
    """Round 1: n prompts, each with a long and a short answer (a pair) and a revision
    (an SFT row); and n verifiable prompts, the round's draw (what GRPO trains on)."""
    model = resolve_model(model_dir)
    store.write({"models": [model.record("base")]})
    store.upsert_round(RUN, 1, model.model_id)
    drawn = load_prompts(DATA_DIR / "prompts" / "verifiable_train.jsonl")[:n]
    ctx = RoundContext(RUN, 1, model.model_id, 0)
    store.write(draw_rows(drawn, ctx))
    prompts = load_prompts(DATA_DIR / "prompts" / "helpful.jsonl")
    prompts = (prompts * (n // len(prompts) + 1))[:n]
    words = " ".join(p.text for p in prompts).split()
    rows = {"prompts": [], "generations": [], "pairs": [], "sft_examples": []}
    seen = set()
    for i, p in enumerate(prompts):
        if p.prompt_id not in seen:
            rows["prompts"].append(p.record(RUN, 1))
            seen.add(p.prompt_id)
        ids = []
        for role, text in (
            ("candidate", answer(words, i, 40 + i % 30)),
            ("candidate", answer(words, i + 7, 6)),
            ("revision", answer(words, i + 3, 30 + i % 20)),
        ):
            gid = row_id(RUN, i, role, len(ids))
            ids.append(gid)
            rows["generations"].append(
                {
                    "generation_id": gid,
                    "run_id": RUN,
                    "round": 1,
                    "method": "self_reward" if role == "candidate" else "cai",
                    "prompt_id": p.prompt_id,
                    "model_id": model.model_id,
                    "role": role,
                    "sample_idx": len(ids) - 1,
                    "text": text,
                    "sampling_json": "{}",
                    "seed": 0,
                }
            )
        rows["pairs"].append(
            {
                "pair_id": row_id(RUN, "pair", i),
                "run_id": RUN,
                "round": 1,
                "method": "self_reward",
                "variant": "bench",
                "prompt_id": p.prompt_id,
                "chosen_generation_id": ids[0],
                "rejected_generation_id": ids[1],
                "margin": 2.0,
                "soft_label": None,
                "flagged": False,
                "flag_reason": None,
                "model_id": model.model_id,
            }
        )
        rows["sft_examples"].append(
            {
                "sft_id": row_id(RUN, "sft", i),
                "run_id": RUN,
                "round": 1,
                "method": "cai",
                "prompt_id": p.prompt_id,
                "generation_id": ids[2],
            }
        )
    store.write(rows)


def rule_reward(prompts, completions, **_) -> list[float | None]:
    """The verifiable rule as a plain TRL reward function (the direct path's)."""
    from pipeline.verifiable.judge import score_on_topic

    return [
        score_on_topic(p[-1]["content"], c[-1]["content"])
        for p, c in zip(prompts, completions, strict=True)
    ]


def direct_grpo(model_dir: Path, data_dir: Path, t: dict, out: Path) -> tuple[float, list]:
    """TRL's GRPOTrainer on the same snapshot, settings and rule, in this process; its
    wall time and per-step mean reward."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()
    data = load_dataset("parquet", data_files={"train": str(data_dir / "train.parquet")})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = t["grpo"]
    config = GRPOConfig(
        output_dir=str(out / "trainer"),
        learning_rate=t["learning_rate"],
        per_device_train_batch_size=t["batch_size"],
        max_steps=g["max_steps"],
        num_generations=g["num_generations"],
        max_completion_length=g["max_completion_length"],
        beta=g["beta"],
        temperature=g["temperature"],
        top_p=g["top_p"],
        seed=1,
        use_cpu=True,
        bf16=False,  # prefloop trains in fp32 on CPU; GRPOConfig's default is bf16 autocast
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[rule_reward],
        args=config,
        train_dataset=data["train"],
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return time.perf_counter() - start, rewards


def step_rewards(store: Store, output_model_id: str) -> list[float]:
    """The mean reward of each training step of a stored grpo step, from its rollouts."""
    rows = store.query(
        "SELECT step, avg(reward) AS r FROM rollouts WHERE model_id = ? AND phase = 'rollout' "
        "GROUP BY step ORDER BY step",
        [output_model_id],
    )
    return [r["r"] for r in rows]


def grpo_step(training: dict, args) -> TrainingConfig:
    """The grpo step to time: the small default (2 prompts x 4 answers of 96 tokens a
    step), or with --grpo-config the shipped config's own step (its batch, answers, tokens,
    sampling, learning rate, reward and steps). Nothing is held out on either path."""
    if args.grpo_config:
        steps = load_config(args.grpo_config).training.step_list()
        step = next(s for s in steps if s.kind == "grpo")
        update = {"heldout_fraction": 0.0}
        if args.grpo_steps:
            update["grpo"] = step.grpo.model_copy(update={"max_steps": args.grpo_steps})
        return step.model_copy(update=update)
    online = {
        "num_generations": 4,
        "max_steps": args.grpo_steps or 8,
        "max_completion_length": 96,
        "beta": 0.04,
        "temperature": 0.8,
        "top_p": 0.95,
    }
    reward = {"kind": "function", "function": "pipeline.verifiable.judge:score_on_topic"}
    settings = {**training, "batch_size": 8, "grpo": online, "reward": reward}
    return RunConfig(training={**settings, "steps": ["grpo"]}).training.step_list()[0]


def bench_grpo(store: Store, model_dir: Path, tmp: Path, training: dict, args) -> None:
    step = grpo_step(training, args)
    folder = tmp / "runs" / "grpo"
    times: dict[str, list[float]] = {"prefloop": [], "direct": []}
    rewards: dict[str, list] = {}
    one = step.model_copy(update={"grpo": step.grpo.model_copy(update={"max_steps": 1})})
    warm = train_step(store, one, RUN, 1, folder / "warm", 0)  # the snapshot
    data_dir = folder / "warm" / "data-grpo"
    t = step.model_dump(mode="json")
    direct_grpo(model_dir, data_dir, {**t, "grpo": {**t["grpo"], "max_steps": 1}}, tmp / "gw")
    for r in range(args.repeats):
        start = time.perf_counter()
        result = train_step(store, step, RUN, 1, folder / str(r), 0)
        times["prefloop"].append(time.perf_counter() - start)
        rewards["prefloop"] = step_rewards(store, result["model_id"])
        wall, rewards["direct"] = direct_grpo(model_dir, data_dir, t, tmp / f"g{r}")
        times["direct"].append(wall)
    med = {k: statistics.median(v) for k, v in times.items()}
    g = step.grpo
    print(
        f"\ngrpo: {warm['rows']['train']} prompts, {g.max_steps} steps of "
        f"{step.batch_size // g.num_generations} prompts x {g.num_generations} answers, "
        f"{g.max_completion_length} new tokens at most, reward {step.reward}"
    )
    print(f"   {'prefloop step':<34} {med['prefloop']:7.2f} s")
    print(f"   {'TRL called directly':<34} {med['direct']:7.2f} s")
    print(f"   throughput ratio direct / prefloop: {med['direct'] / med['prefloop']:.3f}")
    print(f"   prefloop overhead (the whole step): {med['prefloop'] - med['direct']:.1f} s")
    shown = {k: [round(x, 4) for x in v] for k, v in rewards.items()}
    print("   per-step reward: " + json.dumps(shown))
    print("   raw: " + json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}))
    record = {
        "bench": "training.grpo",
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": args.model,
        "settings": {
            **step.model_dump(mode="json", exclude_none=True),
            "config": str(args.grpo_config) if args.grpo_config else None,
            "prompts": warm["rows"]["train"],
            "repeats": args.repeats,
        },
        "seconds": times,
        "ratio_direct_over_prefloop": med["direct"] / med["prefloop"],
        "step_rewards": shown,
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def direct(kind: str, model_dir: Path, data_dir: Path, t: dict, out: Path) -> float:
    """The same trainer, settings and snapshot, called in this process."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    start = time.perf_counter()
    data = load_dataset(
        "parquet", data_files={s: str(data_dir / f"{s}.parquet") for s in ("train",)}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = {
        "output_dir": str(out / "trainer"),
        "learning_rate": t["learning_rate"],
        "num_train_epochs": t["epochs"],
        "per_device_train_batch_size": t["batch_size"],
        "max_length": t["max_length"],
        "seed": 1,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }
    if kind == "dpo":
        train = data["train"].select_columns(["prompt", "chosen", "rejected"])
        config = DPOConfig(**args, beta=t["beta"], loss_type=["sigmoid"])
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=train, processing_class=tokenizer
        )
    else:
        train = data["train"].select_columns(["messages"])
        config = SFTConfig(**args, packing=False)
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=train, processing_class=tokenizer
        )
    trainer.train()
    trainer.model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["dpo", "sft", "grpo"])
    ap.add_argument("--grpo-steps", type=int, default=None, help="default 8, or the config's")
    ap.add_argument(
        "--grpo-config", type=Path, default=None, help="time this config's grpo step as shipped"
    )
    args = ap.parse_args()
    model_dir = resolve_model(args.model).path
    training = {
        "learning_rate": 1e-5,
        "epochs": 1,
        "batch_size": 4,
        "max_length": 256,
        "heldout_fraction": 0.0,  # the direct path evaluates nothing either
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = RunConfig(name=RUN, db_path=tmp / "db.duckdb", runs_dir=tmp / "runs")
        store = Store(cfg.db_path)
        write_round(store, model_dir, args.rows)
        print(f"training steps on {args.model}: {args.rows} rows, batch 4, 1 epoch, CPU")
        if "grpo" in args.kinds:
            bench_grpo(store, model_dir, tmp, training, args)
        for kind in [k for k in args.kinds if k != "grpo"]:
            step = RunConfig(training={**training, "steps": [kind]}).training.step_list()[0]
            times: dict[str, list[float]] = {"prefloop": [], "direct": []}
            trainer_s = []
            folder = tmp / "runs" / f"{kind}"
            first = train_step(store, step, RUN, 1, folder / "warm", 0)  # the snapshot
            data_dir = folder / "warm" / f"data-{kind}"
            direct(kind, model_dir, data_dir, step.model_dump(), tmp / "warm-direct")
            for r in range(args.repeats):
                start = time.perf_counter()
                result = train_step(store, step, RUN, 1, folder / str(r), 0)
                times["prefloop"].append(time.perf_counter() - start)
                trainer_s.append(result["metrics"]["train_seconds"])
                times["direct"].append(
                    direct(kind, model_dir, data_dir, step.model_dump(), tmp / f"d{kind}{r}")
                )
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"\n{kind}: {first['rows']['train']} rows, {first['metrics']['steps']} steps")
            print(f"   {'prefloop step':<34} {med['prefloop']:7.2f} s")
            print(f"   {'  of which trainer.train()':<34} {statistics.median(trainer_s):7.2f} s")
            print(f"   {'TRL called directly':<34} {med['direct']:7.2f} s")
            print(f"   wall-time ratio prefloop / direct: {med['prefloop'] / med['direct']:.2f}")
            print(f"   prefloop overhead per step: {med['prefloop'] - med['direct']:.1f} s")
            print("   raw: " + json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
