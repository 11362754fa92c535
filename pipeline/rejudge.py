"""Re-judge a stored round: score its Self-Rewarding candidates with another judge without
generating anything, build that judge's pairs as a variant, and compare two judges.

Judgments land under the new judge's id, batch by batch (one transaction each); what a
judge has already scored is skipped (an anti-join), so a killed re-judge resumes and a
repeated one adds nothing. The round's own pairs, the ones it trained on, are never
touched: a judge's pairs are built from its scores when asked (`judge_pairs`).
"""

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.engines import GENERATE, SCORE
from pipeline.errors import PrefloopError
from pipeline.evaluation.metrics import (
    JUDGE_COMPARISON,
    JUDGE_PARSE_FAILURE_RATE,
    evaluation_row,
)
from pipeline.judging import JUDGES, Judge, build_judge, judge_candidates, judge_model, load_judge
from pipeline.judging.checklist import COMBINE
from pipeline.judging.compare import compare_scores
from pipeline.judging.pairs import PairPolicy, score_summary, select_pairs
from pipeline.models import MODELS_DIR, ModelInfo, resolve_model
from pipeline.rounds import prompt_from_row
from pipeline.rows import RoundContext, Rows
from pipeline.store import Store
from pipeline.templates import SUFFIX, TemplateLibrary

METHOD = "self_reward"


def judge_settings_from(spec: str, model: str | None = None) -> Any:
    """Judge settings from what a user types: `checklist` or `checklist:<combine>` (the
    checklist judge, on `model`), `module:function`, a reward-model directory (or a name
    under data/models/), or a template name or `.j2` path (judged by `model`, by default
    the round's own)."""
    kind, _, combine = spec.partition(":")
    if kind == "checklist":
        if combine and combine not in COMBINE:
            raise PrefloopError(f"--judge {spec}: combine must be one of {sorted(COMBINE)}")
        chosen = {"combine": combine} if combine else {}  # else the judge's own default
        return JUDGES["checklist"].config(**chosen, model=model)
    path = Path(spec)
    if path.suffix != SUFFIX and (path.is_dir() or (MODELS_DIR / spec).is_dir()):
        return JUDGES["reward_model"].config(model=spec)
    if ":" in spec and path.suffix != SUFFIX and not path.exists():
        return JUDGES["function"].config(function=spec)
    return JUDGES["template"].config(template=spec, model=model)


class _Lazy:
    """An engine started on first use: a re-judge with nothing left to do starts none."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start, self._engine = start, None

    def __getattr__(self, name: str) -> Any:
        if self._engine is None:
            self._engine = self._start()
        return getattr(self._engine, name)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


@dataclass
class RejudgeResult:
    judge_id: str
    candidates: int
    added: int  # judgments written now
    already: int  # candidates this judge had scored before


def rejudge_round(
    store: Store,
    cfg: RunConfig,
    run_id: str,
    round_: int,
    settings: Any,
    start_engine: Callable[[str, str], Any],
    library: TemplateLibrary | None = None,
) -> RejudgeResult:
    """Score round `round_`'s stored Self-Rewarding candidates with the judge `settings`
    describe. `start_engine(model_path, role)` starts the engine it runs on (role
    "generate" or "score"), only if something is left to judge."""
    info = store.round_info(run_id, round_)
    if info is None:
        raise PrefloopError(f"{store.path}: run {run_id!r} has no round {round_}")
    if info["status"] != "finished":
        raise PrefloopError(
            f"{store.path}: run {run_id!r} round {round_} is not finished; re-judge it after "
            "the round ends (`prefloop status` shows it)"
        )
    round_model = (info["model_id"], store.model(info["model_id"])["path"])
    judge, engine, own_model = _open_judge(settings, library, round_model, start_engine)
    if own_model is not None:
        store.write({"models": [own_model.record("judge")]})
    try:
        candidates = store.round_candidates(run_id, round_, METHOD)
        done = store.judged_generations(run_id, round_, METHOD, judge.judge_id)
        todo = [c for c in candidates if c["generation_id"] not in done]
        ctx = RoundContext(run_id, round_, info["model_id"], cfg.seed + round_)
        added = 0
        for batch in _by_prompt_batches(todo, cfg.engine.batch_size):
            prompts = [
                prompt_from_row(p)
                for p in store.prompts_by_id(run_id, sorted({c["prompt_id"] for c in batch}))
            ]
            rows = judge_candidates(judge, prompts, batch, ctx, METHOD)
            rows.pop("discards", None)  # the round stored these when it judged first
            added += store.write(rows).get("judgments", 0)
    finally:
        if engine is not None:
            engine.close()
    return RejudgeResult(judge.judge_id, len(candidates), added, len(done))


def _by_prompt_batches(candidates: Sequence[dict], prompts_per_batch: int) -> list[list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        groups[c["prompt_id"]].append(c)
    ordered = list(groups.values())
    return [
        [c for group in ordered[i : i + prompts_per_batch] for c in group]
        for i in range(0, len(ordered), prompts_per_batch)
    ]


def _open_judge(
    settings: Any,
    library: TemplateLibrary | None,
    round_model: tuple[str | None, str | None],
    start_engine: Callable[[str, str], Any],
) -> tuple[Judge, _Lazy | None, ModelInfo | None]:
    """The judge `settings` describe, on an engine started only when it is first used: on
    its own model if the settings name one (returned, for registering), else on
    `round_model` (id, path)."""
    loaded = load_judge(settings, library or TemplateLibrary())
    kind = JUDGES[settings.kind]
    name = judge_model(settings)
    own = resolve_model(name) if name is not None else None
    model_id, path = (own.model_id, str(own.path)) if own else round_model
    role = SCORE if kind.scorer else GENERATE
    engine = _Lazy(lambda: start_engine(path, role)) if kind.needs_engine else None
    judge = build_judge(settings, loaded, engine, model_id if kind.needs_engine else None)
    return judge, engine, own


def judge_identity(settings: Any, library: TemplateLibrary | None = None) -> str:
    """The judge id a judge spec stores its judgments under, without starting anything
    (on the round's own model a template judge's id is its template id alone)."""
    return _open_judge(settings, library, (None, None), lambda path, role: None)[0].judge_id


def round_policy(info: dict[str, Any]) -> PairPolicy:
    """The pair policy a round (its `rounds` row) stored for Self-Rewarding."""
    stored = json.loads(info.get("pair_policy_json") or "{}").get(METHOD, {})
    fields = {k: stored[k] for k in PairPolicy.__dataclass_fields__ if k in stored}
    return PairPolicy(**fields)


def judge_pairs(
    store: Store, run_id: str, round_: int, judge_id: str, candidates: list[dict] | None = None
) -> Rows:
    """The pairs judge `judge_id` makes from its scores of the round's candidates (read
    here unless given), with the round's pair policy, as the variant
    `<strategy>/judge=<id>` (not stored)."""
    if candidates is None:
        candidates = store.round_candidates(run_id, round_, METHOD)
    judgments = store.judge_judgments(run_id, round_, METHOD, judge_id)
    if not judgments:
        known = ", ".join(store.round_judges(run_id, round_, METHOD)) or "none"
        raise PrefloopError(
            f"{store.path}: judge {judge_id!r} has not scored run {run_id!r} round {round_} "
            f"(judges there: {known}); run `prefloop judge` first"
        )
    prompt_ids = sorted({c["prompt_id"] for c in candidates})
    prompts = [prompt_from_row(p) for p in store.prompts_by_id(run_id, prompt_ids)]
    info = store.round_info(run_id, round_)
    ctx = RoundContext(run_id, round_, info["model_id"], 0)
    policy = round_policy(info)
    variant = f"{policy.strategy}/judge={judge_id}"
    return select_pairs(prompts, candidates, judgments, ctx, policy, METHOD, variant)


def judge_pair_texts(store: Store, run_id: str, round_: int, judge_id: str) -> list[dict]:
    """`judge_pairs` with the prompt's messages and both texts, shaped as the training
    export reads pairs (pair_id order)."""
    candidates = store.round_candidates(run_id, round_, METHOD)
    pairs = judge_pairs(store, run_id, round_, judge_id, candidates)["pairs"]
    texts = {c["generation_id"]: c["text"] for c in candidates}
    prompts = {
        p["prompt_id"]: p for p in store.prompts_by_id(run_id, [p["prompt_id"] for p in pairs])
    }
    return sorted(
        (
            {
                **p,
                "messages_json": prompts[p["prompt_id"]]["messages_json"],
                "prompt": prompts[p["prompt_id"]]["text"],
                "chosen": texts[p["chosen_generation_id"]],
                "rejected": texts[p["rejected_generation_id"]],
                "soft_label": None,
            }
            for p in pairs
        ),
        key=lambda p: p["pair_id"],
    )


def compare_judges(
    store: Store, run_id: str, round_: int, judge_a: str, judge_b: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judges a and b on the round's candidates: the comparison, and its evaluations rows
    (pair agreement, Kendall's tau per prompt, same best and worst, with both judges'
    parse-failure rates and score distributions in details)."""
    candidates = store.round_candidates(run_id, round_, METHOD)
    found = []
    for judge_id in (judge_a, judge_b):
        rows = store.judge_judgments(run_id, round_, METHOD, judge_id)
        if not rows:
            raise PrefloopError(
                f"{store.path}: judge {judge_id!r} has not scored run {run_id!r} round {round_}"
            )
        summary = score_summary(rows)
        found.append(
            (
                {g: s["mean"] for g, s in summary.items()},
                {g: (s["valid"], s["samples"]) for g, s in summary.items()},
            )
        )
    (scores_a, samples_a), (scores_b, samples_b) = found
    result = compare_scores(candidates, scores_a, scores_b, samples_a, samples_b)
    info = store.round_info(run_id, round_)
    ctx = RoundContext(run_id, round_, info["model_id"], 0)
    details = {**result, "judge_a": judge_a, "judge_b": judge_b}
    rows = [
        evaluation_row(ctx, metric, result[key], METHOD, key=(judge_a, judge_b), **details)
        for metric, key in JUDGE_COMPARISON.items()
    ]
    for judge_id, summary in ((judge_a, result["a"]), (judge_b, result["b"])):
        rows.append(
            evaluation_row(
                ctx,
                JUDGE_PARSE_FAILURE_RATE,
                summary["parse_failure_rate"],
                METHOD,
                key=(judge_id,),
                judge=judge_id,
                samples=summary["samples"],
                scores=summary["scores"],
            )
        )
    return result, rows
