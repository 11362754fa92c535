"""The peer's side of bench/peers.py: the same preference job as a distilabel pipeline.
Runs in distilabel's own virtual environment (bench/peers.py makes it), never in the
project's; it imports nothing of prefloop.

    python bench/peers_distilabel.py JOB.json

JOB.json: {"prompts": [...], "base_url", "model", "candidates", "answer": {temperature,
top_p, max_tokens}, "judge": {...}, "judge_template": PATH, "cache_dir", "out"}.

Pipeline: LoadDataFromDicts -> TextGeneration (num_generations = candidates, one row per
candidate) -> a rating Task that sends prefloop's judge template, rendered per
candidate, and parses its "Score: N" line with the template's own pattern and range ->
a global step that makes best vs worst per prompt (equal scores: no pair). With
`use_cache=True`, a run killed part way resumes from the batches distilabel cached.
"""

import json
import re
import sys
from pathlib import Path

import jinja2
from distilabel.models.llms import OpenAILLM
from distilabel.pipeline import Pipeline
from distilabel.steps import GlobalStep, LoadDataFromDicts, StepInput
from distilabel.steps.tasks import Task, TextGeneration

BATCH = 16  # rows per batch through every step


def _template(path: str) -> tuple[jinja2.Template, re.Pattern, float, float]:
    """prefloop's template body (its front matter is a Jinja comment) and its parser."""
    text = Path(path).read_text()
    pattern = re.search(r"pattern: '(.*)'", text).group(1)
    low = float(re.search(r"\n  min: (\S+)", text).group(1))
    high = float(re.search(r"\n  max: (\S+)", text).group(1))
    body = jinja2.Environment(keep_trailing_newline=True).from_string(text)
    return body, re.compile(pattern), low, high


class RateWithTemplate(Task):
    """One judge call per candidate with prefloop's rubric text; the last score line wins."""

    template_path: str

    def load(self) -> None:
        super().load()
        self._body, self._pattern, self._low, self._high = _template(self.template_path)

    @property
    def inputs(self) -> list[str]:
        return ["instruction", "generation"]

    @property
    def outputs(self) -> list[str]:
        return ["score", "judge_raw", "model_name"]

    def format_input(self, input: dict) -> list[dict]:
        text = self._body.render(instruction=input["instruction"], response=input["generation"])
        return [{"role": "user", "content": text.strip()}]

    def format_output(self, output: str | None, input: dict | None = None) -> dict:
        found = self._pattern.findall(output or "")
        score = float(found[-1]) if found else None
        if score is not None and not self._low <= score <= self._high:
            score = None
        return {"score": score, "judge_raw": output}


class BestVsWorst(GlobalStep):
    """Per prompt, the best-scored candidate against the worst (unscored ones left out,
    equal scores make no pair)."""

    @property
    def inputs(self) -> list[str]:
        return ["instruction", "generation", "score"]

    @property
    def outputs(self) -> list[str]:
        return ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]

    rated_path: str

    def process(self, inputs: StepInput):
        rated = [r for r in inputs if r.get("score") is not None]
        Path(self.rated_path).write_text(str(len(rated)))  # what reached the end
        by_prompt: dict[str, list[dict]] = {}
        for row in inputs:
            if row.get("score") is not None and row.get("generation") is not None:
                by_prompt.setdefault(row["instruction"], []).append(row)
        pairs = []
        for prompt, rows in by_prompt.items():
            best = max(rows, key=lambda r: r["score"])
            worst = min(rows, key=lambda r: r["score"])
            if best["score"] > worst["score"]:
                pairs.append(
                    {
                        "prompt": prompt,
                        "chosen": best["generation"],
                        "rejected": worst["generation"],
                        "score_chosen": best["score"],
                        "score_rejected": worst["score"],
                    }
                )
        yield pairs


def llm(job: dict, sampling: dict) -> OpenAILLM:
    return OpenAILLM(
        model=job["model"],
        base_url=job["base_url"],
        api_key="unused",
        generation_kwargs={
            "temperature": sampling["temperature"],
            "top_p": sampling["top_p"],
            "max_new_tokens": sampling["max_tokens"],
        },
    )


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    with Pipeline(name="prefloop-peer", cache_dir=job["cache_dir"]) as pipeline:
        load = LoadDataFromDicts(
            data=[{"instruction": p} for p in job["prompts"]], batch_size=BATCH
        )
        generate = TextGeneration(
            llm=llm(job, job["answer"]),
            num_generations=job["candidates"],
            group_generations=False,
            input_batch_size=BATCH,
        )
        rate = RateWithTemplate(
            llm=llm(job, job["judge"]), template_path=job["judge_template"], input_batch_size=BATCH
        )
        pairs = BestVsWorst(rated_path=job["out"] + ".rated")
        load >> generate >> rate >> pairs
    distiset = pipeline.run(use_cache=True)
    rows = distiset["default"]["train"]
    rated = int(Path(job["out"] + ".rated").read_text())
    Path(job["out"]).write_text(
        json.dumps({"pairs": len(rows), "rated": rated, "columns": rows.column_names})
    )


if __name__ == "__main__":
    main()
