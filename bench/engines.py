"""Engine benchmark: the same requests through each path, side by side, printed as ratios.

    .venv/bin/python bench/engines.py [--model smollm2-135m-instruct] [--sequences 32]

1. prefloop's vLLM engine vs raw `vllm.LLM.chat` on the same LLM object (wrapper overhead);
2. prefloop's vLLM engine vs its transformers engine;
3. `n=4` samples per request vs four copies of each request.
Timings are noisy on a shared 2-core machine: the vLLM paths alternate and repeat.
"""

import argparse
import time

from pipeline.engines import Sampling, start_engine
from pipeline.models import resolve_model
from pipeline.paths import DATA_DIR
from pipeline.schema import EngineConfig
from pipeline.seeds import load_prompt_file


def timed(fn):
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    model = resolve_model(args.model)
    prompts = load_prompt_file(DATA_DIR / "prompts" / "helpful.jsonl")
    convs = [prompts[i % len(prompts)] for i in range(args.sequences)]
    params = Sampling(n=1, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
    rows: dict[str, float] = {}

    with start_engine(model.path, EngineConfig(kind="vllm", cpu_kv_cache_gib=2), seed=0) as vllm:
        from vllm import SamplingParams

        raw_params = SamplingParams(n=1, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)

        def ours():
            return sum(c.n_tokens for r in vllm.generate(convs, params) for c in r)

        def raw():
            outs = vllm.llm.chat(convs, raw_params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        ours()  # warm-up
        totals = {"prefloop vllm": [0, 0.0], "raw vllm.LLM.chat": [0, 0.0]}
        for _ in range(args.repeats):
            for name, fn in (("prefloop vllm", ours), ("raw vllm.LLM.chat", raw)):
                tokens, seconds = timed(fn)
                totals[name][0] += tokens
                totals[name][1] += seconds
        for name, (tokens, seconds) in totals.items():
            rows[name] = tokens / seconds

        group = convs[: max(1, args.sequences // 4)]
        n4 = Sampling(n=4, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
        tokens, seconds = timed(
            lambda: sum(c.n_tokens for r in vllm.generate(group, n4) for c in r)
        )
        rows["vllm n=4"] = tokens / seconds
        repeated = [c for c in group for _ in range(4)]
        tokens, seconds = timed(
            lambda: sum(c.n_tokens for r in vllm.generate(repeated, params) for c in r)
        )
        rows["vllm 4 copies, n=1"] = tokens / seconds

    if not args.skip_hf:
        with start_engine(model.path, EngineConfig(kind="hf"), seed=0) as hf:
            tokens, seconds = timed(
                lambda: sum(c.n_tokens for r in hf.generate(convs, params) for c in r)
            )
            rows["prefloop hf"] = tokens / seconds

    print(f"\n{args.sequences} sequences x {args.max_tokens} new tokens, {model.model_id}")
    for name, tps in rows.items():
        print(f"  {name:<22} {tps:8.1f} tokens/s")
    print("ratios")
    overhead = rows["prefloop vllm"] / rows["raw vllm.LLM.chat"]
    print(f"  prefloop vllm / raw vllm    {overhead:.3f}  (target >= 0.95)")
    if "prefloop hf" in rows:
        print(f"  vllm engine / hf engine     {rows['prefloop vllm'] / rows['prefloop hf']:.2f}x")
    print(f"  n=4 / four copies           {rows['vllm n=4'] / rows['vllm 4 copies, n=1']:.2f}x")


if __name__ == "__main__":
    main()
