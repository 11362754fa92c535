"""The peer's side of bench/peers.py: the same preference job as a distilabel pipeline.
Runs in distilabel's own virtual environment (bench/peers.py makes it), never in the
project's; it imports nothing of prefloop.

    python bench/peers_distilabel.py JOB.json

JOB.json: {"prompts": [...], "base_url", "model", "candidates", "answer": {temperature,
top_p, max_tokens}, "judge": {...}, "judge_template": PATH, "cache_dir", "out"}.

Pipeline: LoadDataFromDicts -> TextGeneration (num_generations = candidates, one row per
candidate) -> a rating Task that sends prefloop's prefilled judge template, rendered per
candidate, and reads the score from the next token's log-probabilities -> a global step
that makes best vs worst per prompt (equal scores: no pair). With
`use_cache=True`, a run killed part way resumes from the batches distilabel cached.
"""

import json
import math
import re
import sys
from pathlib import Path

import jinja2
from distilabel.models.llms import OpenAILLM
from distilabel.pipeline import Pipeline
from distilabel.steps import GlobalStep, LoadDataFromDicts, StepInput
from distilabel.steps.tasks import Task, TextGeneration

BATCH = 16  # rows per batch through every step


def _template(path: str) -> tuple[jinja2.Template, float, float, str]:
    """prefloop's template body (its front matter is a Jinja comment), its score range and
    the reply's prefilled start."""
    text = Path(path).read_text()
    low = float(re.search(r"\n  min: (\S+)", text).group(1))
    high = float(re.search(r"\n  max: (\S+)", text).group(1))
    prefix = re.search(r'\n  prefix: "(.*)"', text).group(1)
    body = jinja2.Environment(keep_trailing_newline=True).from_string(text)
    return body, low, high, prefix


class RatePrefilled(Task):
    """One judge call per candidate with prefloop's rubric text and its prefilled reply
    ("Score: "): the server continues that reply (vLLM's `continue_final_message`) by one
    token and returns its top log-probabilities; the score is the expected value over
    the digits in range among them (G-Eval style), as prefloop's prefilled judge reads."""

    template_path: str

    def load(self) -> None:
        super().load()
        self._body, self._low, self._high, self._prefix = _template(self.template_path)

    @property
    def inputs(self) -> list[str]:
        return ["instruction", "generation"]

    @property
    def outputs(self) -> list[str]:
        return ["score", "model_name"]

    def format_input(self, input: dict) -> list[dict]:
        text = self._body.render(instruction=input["instruction"], response=input["generation"])
        return [
            {"role": "user", "content": text.strip()},
            {"role": "assistant", "content": self._prefix},
        ]

    def format_output(self, output: str | None, input: dict | None = None) -> dict:
        return {"score": None}  # read from the log-probabilities in _format_outputs

    def _format_outputs(self, outputs, input=None):
        rows = super()._format_outputs(outputs, input)
        for row in rows:
            positions = row.get(f"llm_{self.name}_logprobs") or []
            row["score"] = self._expected(positions[0] if positions else None)
        return rows

    def _expected(self, top: list[dict] | None) -> float | None:
        digits = {}
        for entry in top or []:
            token = entry["token"].strip()
            if token.isdigit() and self._low <= int(token) <= self._high:
                digits.setdefault(int(token), math.exp(entry["logprob"]))
        total = sum(digits.values())
        return sum(d * p for d, p in digits.items()) / total if total else None


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


def judge_llm(job: dict) -> OpenAILLM:
    """One token after the prefilled reply, with the server's top 20 log-probabilities."""
    return OpenAILLM(
        model=job["model"],
        base_url=job["base_url"],
        api_key="unused",
        generation_kwargs={
            "temperature": 0.0,
            "max_new_tokens": 1,
            "logprobs": True,
            "top_logprobs": 20,
            "extra_body": {"continue_final_message": True, "add_generation_prompt": False},
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
        rate = RatePrefilled(
            llm=judge_llm(job), template_path=job["judge_template"], input_batch_size=BATCH
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
