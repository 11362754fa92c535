"""Stage benchmark: the Self-Rewarding stage at the engine's speed, and the judge's prefix
sharing, side by side in one run.

    .venv/bin/python bench/stages.py [--prompts 8] [--max-tokens 64] [--repeats 2]

1. Stage overhead: prefloop's Self-Rewarding stage (N candidates, K judge samples with the
   paper's free-form judge, parsing, pair selection, rows) vs a raw script making the same
   two `LLM.chat` calls with the same prompts and parameters on the same vLLM object.
   Ratio of generated tokens/s; target >= 0.95.
2. Judge prefix sharing: the judge stage over the same candidates on two fresh engines,
   prefix caching on and off. Prints the prefix-cache hit rate the engine reports
   (target >= 80%) and the judge's prompt tokens/s with caching on vs off.
"""

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jinja2 import Template as JinjaTemplate  # noqa: E402

from pipeline.config import EngineConfig, SelfRewardConfig  # noqa: E402
from pipeline.engines import Sampling, start_engine  # noqa: E402
from pipeline.methods import self_reward  # noqa: E402
from pipeline.methods.common import RoundContext  # noqa: E402
from pipeline.models import resolve_model  # noqa: E402
from pipeline.paths import DATA_DIR, PROMPTS_DIR  # noqa: E402
from pipeline.seeds import load_prompts  # noqa: E402
from pipeline.templates import TemplateLibrary  # noqa: E402

SCORE = re.compile(r"Score:\s*\**\s*(-?\d+(?:\.\d+)?)")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--judge-samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model = resolve_model(args.model)
    prompts = load_prompts(DATA_DIR / "prompts" / "helpful.jsonl")[: args.prompts]
    library = TemplateLibrary()
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_tokens": args.max_tokens}
    cfg = SelfRewardConfig(
        n_candidates=args.candidates,
        sampling=sampling,
        judge_template="judge_additive_5pt",
        judge_samples=args.judge_samples,
        judge_sampling=sampling,
    )
    judge = library.get("judge_additive_5pt")
    ctx = RoundContext("bench", 1, model.model_id, 0)

    # 1. Stage overhead, on one engine, the two paths alternating.
    engine_cfg = EngineConfig(kind="vllm", cpu_kv_cache_gib=2)
    totals = {"prefloop self_reward stage": [0, 0.0], "raw vLLM script": [0, 0.0]}
    with start_engine(model.path, engine_cfg, seed=0) as engine:

        def ours() -> int:
            before = engine.counter.completion_tokens
            rows = self_reward.run_self_reward(engine, engine, judge, prompts, ctx, cfg)
            assert rows["judgments"], "the stage judged nothing"
            return engine.counter.completion_tokens - before

        def raw() -> int:
            return raw_self_reward(
                engine.llm, prompts, args.candidates, args.judge_samples, args.max_tokens
            )[1]

        raw()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("prefloop self_reward stage", ours), ("raw vLLM script", raw)):
                start = time.perf_counter()
                tokens = fn()
                totals[name][0] += tokens
                totals[name][1] += time.perf_counter() - start
        candidates = self_reward.generate_candidates(engine, prompts, ctx, cfg)["generations"]

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
    print(f"  ratio prefloop / raw         {ratio:8.3f}  (target >= 0.95)")

    # 2. Judge prefix sharing: the prefilled judge (prefill only) on fresh engines.
    prefilled = library.get("judge_additive_5pt_prefilled")
    free_form = library.get("judge_additive_5pt")
    results = {}
    for caching in (True, False):
        ecfg = EngineConfig(
            kind="vllm", cpu_kv_cache_gib=2, prefix_caching=caching, engine_stats=True
        )
        with start_engine(model.path, ecfg, seed=0) as engine:
            engine.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=4))
            row = {}
            for name, template in (("prefilled", prefilled), ("free-form", free_form)):
                q0, h0 = engine.prefix_cache_tokens()
                p0 = engine.counter.prompt_tokens
                start = time.perf_counter()
                self_reward.judge_candidates(engine, template, prompts, candidates, ctx, cfg)
                seconds = time.perf_counter() - start
                q1, h1 = engine.prefix_cache_tokens()
                row[name] = {
                    "seconds": seconds,
                    "prompt_tokens": engine.counter.prompt_tokens - p0,
                    "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None,
                }
            results[caching] = row
    print(f"\n2. Judge prefix sharing over {len(candidates)} candidates (fresh engines)")
    for name in ("prefilled", "free-form"):
        on, off = results[True][name], results[False][name]
        hit = on["hit_rate"]
        print(
            f"  {name:<10} hit rate {hit:6.1%} (target >= 80%); caching on "
            f"{on['prompt_tokens'] / on['seconds']:8.1f} prompt tok/s ({on['seconds']:.1f}s), "
            f"off {off['prompt_tokens'] / off['seconds']:8.1f} ({off['seconds']:.1f}s): "
            f"{off['seconds'] / on['seconds']:.2f}x faster with caching"
            if hit is not None
            else f"  {name:<10} no prefix-cache metrics reported"
        )


if __name__ == "__main__":
    main()
