"""The smoke job `make run` runs until the round flows exist: every part, once, for real."""

import time
from collections.abc import Callable

from pipeline.config import RunConfig
from pipeline.engines import Sampling, engine_kind, start_engine
from pipeline.errors import PrefloopError
from pipeline.judging import parse_score
from pipeline.models import resolve_model
from pipeline.seeds import load_prompt_file
from pipeline.store import Store
from pipeline.templates import ScoreParser, TemplateLibrary


def run_smoke(cfg: RunConfig, echo: Callable[[str], None] = print) -> dict:
    # Everything that can fail on bad input is checked before the engine starts.
    model = resolve_model(cfg.model)
    judge = TemplateLibrary().get(cfg.self_reward.judge_template)
    if not isinstance(judge.meta.parser, ScoreParser):
        raise PrefloopError(f"{judge.path}: a judge template needs a `parser` of kind score")
    conversation = load_prompt_file(cfg.prompts.files[0])[0]
    with Store(cfg.db_path) as store:
        store.insert(
            "models",
            [
                {
                    "model_id": model.model_id,
                    "path": str(model.path),
                    "sha256": model.sha256,
                    "kind": "base",
                }
            ],
        )
        store.insert("templates", [judge.record()])

    echo(f"model   {model.model_id} ({engine_kind(cfg.engine)} engine)")
    start = time.perf_counter()
    with start_engine(model.path, cfg.engine, cfg.seed) as engine:
        echo(f"engine  started in {time.perf_counter() - start:.1f}s")
        greedy = Sampling(n=1, temperature=0.0, max_tokens=160)
        answer = engine.generate([conversation], greedy)[0][0]
        judge_prompt = judge.render(instruction=conversation[-1]["content"], response=answer.text)
        judgment = engine.generate([[{"role": "user", "content": judge_prompt}]], greedy)[0][0]
    score, status = parse_score(judgment.text, judge.meta.parser)
    echo(f"prompt  {conversation[-1]['content']}")
    echo(f"answer  {answer.text}")
    echo(f"judge   {judgment.text}")
    echo(f"score   {score} ({status}, template {judge.template_id})")
    echo(f"db      {cfg.db_path}")
    return {"answer": answer.text, "judgment": judgment.text, "score": score, "status": status}
