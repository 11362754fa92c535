"""vLLM-CPU settings, side by side: start-up time and generation tokens/s for the same
requests under each variant, each in a fresh process (vLLM reads these at start).

    .venv/bin/python bench/vllm_cpu.py [--variants default,all_cores,compiled,bf16]

- default:    what prefloop runs (eager, float32, no core reserved);
- one_core:   vLLM's stock policy on this machine: one core reserved for the front end,
              so the model runs on 1 of 2 cores;
- all_cores:  no reserved core (VLLM_CPU_NUM_OF_RESERVED_CPU=0): the model gets both;
- compiled:   torch.compile graphs instead of eager (enforce_eager false);
- bf16:       bfloat16 weights and activations instead of float32;
- block<N>:   KV-cache blocks of N tokens (vLLM-CPU's own default is 128).

Each line also gives the engine's stop time (close() until its processes are gone).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "default": ({}, {}),
    "one_core": ({}, {"cpu_reserved_cores": 1}),
    "all_cores": ({}, {"cpu_reserved_cores": 0}),
    "compiled": ({}, {"enforce_eager": False}),
    "bf16": ({}, {"dtype": "bfloat16"}),
    **{f"block{n}": ({}, {"block_size": n}) for n in (128, 64, 32, 16)},
}


def child(variant: str, sequences: int, max_tokens: int) -> None:
    from pipeline.engines import Sampling, start_engine
    from pipeline.models import resolve_model
    from pipeline.paths import DATA_DIR
    from pipeline.schema import EngineConfig
    from pipeline.seeds import load_prompt_file

    _, settings = VARIANTS[variant]
    model = resolve_model("smollm2-135m-instruct")
    prompts = load_prompt_file(DATA_DIR / "prompts" / "helpful.jsonl")
    convs = [prompts[i % len(prompts)] for i in range(sequences)]
    start = time.perf_counter()
    cfg = EngineConfig(kind="vllm", cpu_kv_cache_gib=2, **settings)
    engine = start_engine(model.path, cfg, seed=0)
    started = time.perf_counter() - start
    params = Sampling(n=1, temperature=0.7, top_p=0.9, max_tokens=max_tokens)
    engine.generate(convs[:2], params)  # warm-up
    start = time.perf_counter()
    tokens = sum(c.n_tokens for r in engine.generate(convs, params) for c in r)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    engine.close()
    stopped = time.perf_counter() - start
    result = {"start_s": started, "tok_s": tokens / seconds, "stop_s": stopped}
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default="default,one_core,all_cores,compiled,bf16")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.sequences, args.max_tokens)
        return
    results = {}
    for variant in args.variants.split(","):
        env_over, _ = VARIANTS[variant]
        env = {**os.environ, **env_over}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--sequences",
                str(args.sequences),
                "--max-tokens",
                str(args.max_tokens),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant}: failed\n{out.stderr[-1500:]}")
            continue
        results[variant] = json.loads(line[7:])
        r = results[variant]
        print(
            f"{variant:<10} start {r['start_s']:6.1f}s  {r['tok_s']:8.1f} generated tok/s  "
            f"stop {r['stop_s']:4.1f}s",
            flush=True,
        )
    base = results.get("default")
    if base:
        print(f"\nratios to default ({args.sequences} sequences x {args.max_tokens} tokens)")
        for variant, r in results.items():
            print(
                f"  {variant:<10} throughput {r['tok_s'] / base['tok_s']:5.2f}x  "
                f"start {r['start_s'] / base['start_s']:5.2f}x"
            )


if __name__ == "__main__":
    main()
