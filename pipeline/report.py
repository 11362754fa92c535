"""The run report: one self-contained HTML file (inline SVG charts from pipeline/charts.py,
nothing loaded from elsewhere) with the key numbers per round, read from the store.

Every text that came from a model or a user file is escaped: the page renders generated
text as text, never as markup.
"""

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from pipeline.charts import bar_chart, histogram, line_chart
from pipeline.errors import StoreError
from pipeline.evaluation.benchmarks import SOURCE as BENCHMARK_SOURCE
from pipeline.evaluation.metrics import (
    AGREEMENT_PAIRWISE,
    AGREEMENT_SELF_JUDGE,
    HELDOUT_CHARS,
    JUDGE_PAIR_AGREEMENT,
    LENGTH_RATIO,
    ORDER_FLIP_RATE,
    PAIR_METRICS,
    WIN_RATE,
)
from pipeline.evaluation.yardstick import (
    INSTRUCTION_STRICT,
    PROMPT_STRICT,
    STRICT_ON_TOPIC,
    split_metric,
    yardstick_splits,
)
from pipeline.evaluation.yardstick import LABELS as YARDSTICK_LABELS
from pipeline.explorer import explorer_data, page_json
from pipeline.plan import FLOW
from pipeline.store import Store
from pipeline.training.kinds import TRAINING_KINDS

DPO_METRICS = TRAINING_KINDS["dpo"].metrics
# Columns of the per-method table, in reading order.
METHOD_METRICS = (*PAIR_METRICS, AGREEMENT_SELF_JUDGE, AGREEMENT_PAIRWISE)

# -- the page -----------------------------------------------------------------------------


def _by_round(evaluations: Sequence[Mapping[str, Any]], metric: str, method=None) -> dict:
    return {
        e["round"]: e
        for e in evaluations
        if e["metric"] == metric and e["method"] == method and e["value"] is not None
    }


def time_split(rounds: Sequence[Mapping], stages: Sequence[Mapping]) -> dict[int, dict]:
    """Per round: seconds per stage (work) in the order of the round's plan, engine
    start-up, the flow's own work (store reads and writes, engine shutdowns), and the
    rest of the round's wall time: orchestration (Prefect's task and flow-run machinery)
    and whatever else was not timed."""
    out: dict[int, dict[str, float]] = {}
    for r in rounds:
        if r["wall_s"] is None:
            continue
        planned = [name for name, _ in json.loads(r.get("plan_json") or "{}").get("stages", [])]
        mine = [s for s in stages if s["round"] == r["round"]]
        order = {name: i for i, name in enumerate(planned)}
        mine.sort(key=lambda s: (order.get(s["stage"], len(order)), s["stage"]))
        parts: dict[str, float] = {}
        for s in mine:
            key = "flow (store, engine stop)" if s["stage"] == FLOW else s["stage"]
            parts[key] = parts.get(key, 0.0) + s["wall_s"]
        parts["engine start"] = sum(s["setup_s"] or 0.0 for s in mine)
        parts["orchestration"] = max(r["wall_s"] - sum(parts.values()), 0.0)
        out[r["round"]] = {"wall_s": r["wall_s"], **parts}
    return out


def _key_numbers(data: Mapping[str, Any], split: Mapping[int, dict]) -> list[dict[str, Any]]:
    """One row per round (and the initial model's as round 0 when the yardstick ran)."""
    evals = data["evaluations"]
    columns = {  # the table's column -> the metric it shows
        "win_rate": WIN_RATE,
        "flip_rate": ORDER_FLIP_RATE,
        "implicit_reward_accuracy": DPO_METRICS["heldout_reward_accuracy"],
        "implicit_reward_margin": DPO_METRICS["heldout_reward_margin"],
    }
    found = {column: _by_round(evals, metric) for column, metric in columns.items()}
    strict = _by_round(evals, PROMPT_STRICT)
    others = {s: _by_round(evals, split_metric(PROMPT_STRICT, s)) for s in yardstick_splits(evals)}
    table = []
    for r in data["rounds"]:
        n = r["round"]
        pairs = {p["method"]: p["n"] for p in data["pairs"] if p["round"] == n}
        row = {"round": n, "model": r["model_id"], "status": r["status"], "wall_s": r["wall_s"]}
        row["pairs"] = ", ".join(f"{m} {c}" for m, c in pairs.items()) or "none"
        row.update({m: e.get(n, {}).get("value") for m, e in found.items()})
        row["ifeval"] = strict.get(n, {}).get("value")
        row["ifeval_splits"] = [e.get(n, {}).get("value") for e in others.values()]
        if n in split and r["wall_s"]:
            row["orchestration_share"] = split[n]["orchestration"] / r["wall_s"]
        table.append(row)
    base = strict.get(0)
    if base is not None and table:  # the initial model's, as round 0
        first = dict.fromkeys(set(table[0]) - {"orchestration_share"}, None)
        first.update(round=0, status="initial", pairs="-", ifeval=base["value"])
        first["ifeval_splits"] = [e.get(0, {}).get("value") for e in others.values()]
        first["model"] = json.loads(base["details_json"])["model"]
        table.insert(0, first)
    return table


def _win_rate_plot(evals: Sequence[Mapping[str, Any]]) -> Markup:
    series = {
        label: [(r, e["value"]) for r, e in _by_round(evals, metric).items()]
        for label, metric in (("win rate", WIN_RATE), ("order-flip rate", ORDER_FLIP_RATE))
    }
    title = "Win rate of M_t+1 over M_t (held-out prompts, fixed judge)"
    return line_chart("win_rate", title, series, "rate", (0.0, 1.0), reference=0.5)


def _yardstick_plot(evals: Sequence[Mapping[str, Any]]) -> Markup | None:
    """Every yardstick metric of the seen split, and the headline two of each other split."""
    series = [(label, metric) for metric, label in YARDSTICK_LABELS.items()]
    for split in yardstick_splits(evals):
        for metric in (PROMPT_STRICT, STRICT_ON_TOPIC):
            series.append((f"{YARDSTICK_LABELS[metric]} ({split})", split_metric(metric, split)))
    stick: dict[str, list[tuple[int, float]]] = defaultdict(list)
    bars: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for label, metric in series:
        for r, e in _by_round(evals, metric).items():
            lo, hi = json.loads(e["details_json"])["ci95"]
            stick[label].append((r, e["value"]))
            bars[label].append((r, lo, hi))
    if not stick:
        return None
    title = "Held-out instruction following of M_t (checked by code; 95% intervals)"
    return line_chart("yardstick", title, stick, "accuracy", (0.0, 1.0), intervals=bars)


def _scores_plot(scores: Sequence[Mapping[str, Any]]) -> Markup:
    by_round: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        by_round[f"round {s['round']}"].append(s["mean_score"])
    top = max((max(v) for v in by_round.values()), default=5.0)
    title = "Self-judge scores of Self-Rewarding candidates"
    return histogram("scores", title, by_round, 10, (0.0, max(5.0, top)))


def _length_plot(evals: Sequence[Mapping[str, Any]], methods: list[str]) -> Markup:
    length: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for m in methods:
        for r, e in _by_round(evals, LENGTH_RATIO, m).items():
            details = json.loads(e["details_json"])
            length[f"{m} chosen"].append((r, details["chosen_chars"]))
            length[f"{m} rejected"].append((r, details["rejected_chars"]))
    for r, e in _by_round(evals, HELDOUT_CHARS).items():
        length["held-out answers of M_t+1"].append((r, e["value"]))
    title = "Answer length by round (characters)"
    return line_chart("length", title, length, "mean characters")


def _agreement_plot(evals: Sequence[Mapping[str, Any]], methods: list[str]) -> Markup:
    agreement: dict[str, dict[str, float]] = defaultdict(dict)
    groups = []
    for metric, short in ((AGREEMENT_PAIRWISE, "pair"), (AGREEMENT_SELF_JUDGE, "self")):
        for m in methods:
            found = _by_round(evals, metric, m)
            if found:
                groups.append(f"{m}/{short}")
                for r, e in found.items():
                    agreement[f"round {r}"][f"{m}/{short}"] = e["value"]
    title = "Agreement with the method's label (pair: pairwise judge, self: self-judge)"
    return bar_chart("agreement", title, groups, agreement, "agreement", (0.0, 1.0))


def _judges_plot(comparisons: Sequence[Mapping[str, Any]]) -> Markup:
    series = {
        name.replace("_", " "): {c["label"]: c[name] for c in comparisons if c[name] is not None}
        for name in ("pair_agreement", "same_best", "same_worst")
    }
    title = "Two judges on the same candidates: how often they agree"
    groups = [c["label"] for c in comparisons]
    return bar_chart("judges", title, groups, series, "share", (0.0, 1.0))


def _time_plot(split: Mapping[int, Mapping[str, float]]) -> Markup:
    parts = list(dict.fromkeys(k for s in split.values() for k in s if k != "wall_s"))
    groups = [f"round {r}" for r in split]
    series = {p: {f"round {r}": s.get(p, 0.0) for r, s in split.items()} for p in parts}
    title = "Where each round's wall time goes (seconds)"
    return bar_chart("time", title, groups, series, "seconds", stacked=True)


def build(data: Mapping[str, Any], run_id: str, db_path: str) -> dict[str, Any]:
    """The page's numbers and plots from `Store.report_data`, section by section."""
    evals = data["evaluations"]
    methods = sorted({p["method"] for p in data["pairs"]})
    split = time_split(data["rounds"], data["stages"])
    comparisons = judge_comparisons(evals)
    benchmark_table = benchmarks(evals)
    plots = {
        "benchmarks": _benchmarks_plot(benchmark_table),
        "win_rate": _win_rate_plot(evals),
        "yardstick": _yardstick_plot(evals),
        "scores": _scores_plot(data["scores"]),
        "length": _length_plot(evals, methods),
        "agreement": _agreement_plot(evals, methods),
        "judges": _judges_plot(comparisons),
        "time": _time_plot(split),
    }
    return {
        "run_id": run_id,
        "db_path": db_path,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "table": _key_numbers(data, split),
        "yardstick_splits": yardstick_splits(evals),
        "per_method": per_method(evals),
        "method_metrics": METHOD_METRICS,
        "split": split,
        "plots": plots,
        "judge_comparisons": comparisons,
        "instruction_kinds": instruction_kinds(evals),
        "benchmarks": benchmark_table,
        "training": training_steps(data.get("training", [])),
    }


def per_method(evals: Sequence[Mapping[str, Any]]) -> dict[tuple[int, str], dict]:
    """Per (round, method): metric -> its evaluations row (the judge comparisons aside)."""
    found: dict[tuple[int, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for e in evals:
        if e["method"] is not None and not e["metric"].startswith("judge_"):
            found[(e["round"], e["method"])][e["metric"]] = e
    return dict(sorted(found.items()))


# A step's held-out numbers, as the report shows them: (label, metrics.json key).
HELDOUT = (
    ("held-out loss", "heldout_loss"),
    ("implicit-reward accuracy", "heldout_reward_accuracy"),
    ("implicit-reward margin", "heldout_reward_margin"),
    ("RM pairwise accuracy", "heldout_pairwise_accuracy"),
)


def training_steps(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per training step: its models (lineage) and held-out numbers, before ->
    after where the trainer measured both."""
    rows = []
    for r in runs:
        m = json.loads(r["metrics_json"] or "{}")
        held = []
        for label, key in HELDOUT:
            if m.get(key) is None:
                continue
            before = m.get(f"{key}_before")
            value = _number(m[key])
            held.append(
                f"{label} {_number(before)} -> {value}"
                if before is not None
                else f"{label} {value}"
            )
        rows.append(
            {
                "round": r["round"],
                "step": r["step"],
                "kind": r["kind"],
                "base": r["base_model_id"],
                "reference": r["reference_model_id"],
                "output": r["output_model_id"],
                "rows": m.get("train_pairs", m.get("train_examples")),
                "heldout_rows": m.get("heldout_pairs", m.get("heldout_examples")),
                "seconds": m.get("train_seconds"),
                "heldout": "; ".join(held) or "-",
            }
        )
    return rows


def instruction_kinds(evaluations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The yardstick per kind of instruction and round (instruction-level strict): for
    each kind, per round the share followed, followed and n, or None where that round's
    model was not measured."""
    per_round = {
        t: json.loads(e["details_json"]).get("per_kind", {})
        for t, e in sorted(_by_round(evaluations, INSTRUCTION_STRICT).items())
    }
    kinds = sorted({k for counts in per_round.values() for k in counts})
    rows = []
    for k in kinds:
        cells = []
        for counts in per_round.values():
            followed, n = counts.get(k, (0, 0))
            cells.append({"share": followed / n, "followed": followed, "n": n} if n else None)
        rows.append({"kind": k, "cells": cells})
    return {"rounds": list(per_round), "rows": rows}


def benchmarks(evaluations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """lm-eval's metrics (`<task>/<metric>`) per model: for each metric, per round its
    value, stderr and sample count, or None where that round's model was not measured."""
    found: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for e in evaluations:
        d = json.loads(e["details_json"] or "{}")
        if d.get("source") == BENCHMARK_SOURCE and e["value"] is not None:
            cell = {"value": e["value"], "stderr": d["stderr"], "n": d["n"]}
            found[e["metric"]][e["round"]] = cell
    rounds = sorted({t for per in found.values() for t in per})
    rows = [{"metric": m, "cells": [found[m].get(t) for t in rounds]} for m in sorted(found)]
    return {"rounds": rounds, "rows": rows}


def _benchmarks_plot(table: Mapping[str, Any]) -> Markup | None:
    series: dict[str, list[tuple[int, float]]] = {}
    bars: dict[str, list[tuple[int, float, float]]] = {}
    for row in table["rows"]:
        cells = [(t, c) for t, c in zip(table["rounds"], row["cells"], strict=True) if c]
        series[row["metric"]] = [(t, c["value"]) for t, c in cells]
        bars[row["metric"]] = [
            (t, c["value"] - c["stderr"], c["value"] + c["stderr"]) for t, c in cells if c["stderr"]
        ]
    if not series:
        return None
    title = "lm-evaluation-harness metrics of M_t (bars: ± one stderr)"
    return line_chart("benchmarks", title, series, "value", intervals=bars)


def judge_comparisons(evaluations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (round, judge a, judge b) that `prefloop judge` compared."""
    found: dict[tuple, dict[str, Any]] = {}
    for e in evaluations:
        if e["metric"] != JUDGE_PAIR_AGREEMENT:
            continue
        d = json.loads(e["details_json"])
        found[(e["round"], d["judge_a"], d["judge_b"])] = {
            "round": e["round"],
            "label": f"r{e['round']}: {_short(d['judge_a'])} vs {_short(d['judge_b'])}",
            "judge_a": d["judge_a"],
            "judge_b": d["judge_b"],
            "prompts": d["prompts"],
            "pair_agreement": d["pair_agreement"],
            "kendall_tau": d["kendall_tau"],
            "same_best": d["same_best"],
            "same_worst": d["same_worst"],
            "parse_failures_a": d["a"]["parse_failure_rate"],
            "parse_failures_b": d["b"]["parse_failure_rate"],
            "scores_a": d["a"]["scores"],
            "scores_b": d["b"]["scores"],
        }
    return [found[k] for k in sorted(found)]


def _short(judge_id: str) -> str:
    return judge_id.split("|")[0].split("@")[0].rsplit("/", 1)[-1]


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(page: Mapping[str, Any]) -> str:
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent),
        autoescape=select_autoescape(["html", "j2"], default=True),
    )
    env.filters["num"] = _number
    return env.get_template("report.html.j2").render(**page)


def report_path(runs_dir: Path | str, run_id: str) -> Path:
    return Path(runs_dir) / run_id / "report.html"


def explorer_section(store: Store, run_id: str) -> dict[str, Any] | None:
    """The pairs explorer's data (None: a page without the section)."""
    return explorer_data(**store.explorer_rows(run_id))


def write_report(db_path: Path | str, run_id: str, out: Path | str) -> Path:
    """Write the run's report; returns its path. Reads the store read-only."""
    with Store(db_path, read_only=True) as store:
        data = store.report_data(run_id)
        explorer = explorer_section(store, run_id) if data["rounds"] else None
    if not data["rounds"]:
        raise StoreError(f"{db_path}: run {run_id!r} has no rounds to report")
    page = build(data, run_id, str(db_path))
    page["explorer"] = explorer
    page["explorer_json"] = Markup(page_json(explorer)) if explorer else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(render(page), encoding="utf-8")
    tmp.replace(out)
    return out
