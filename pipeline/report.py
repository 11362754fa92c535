"""The run report: one self-contained HTML file (inline SVG plots, no scripts or styles
from elsewhere) with the key numbers per round, read from the store.

Every text that came from a model or a user file is escaped: the page renders generated
text as text, never as markup.
"""

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from pipeline.errors import StoreError
from pipeline.store import Store

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#17becf",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#aec7e8",
    "#98df8a",
)
W, H, PAD = 520, 280, 44
BOTTOM = H - PAD - 6  # the x axis; tick labels and the legend go under it
# Columns of the per-method table, in reading order.
METHOD_METRICS = (
    "pairs",
    "tie_rate",
    "parse_failure_rate",
    "mean_margin",
    "judge_variance",
    "length_ratio",
    "duplicate_prompt_rate",
    "agreement_self_judge",
    "agreement_pairwise",
)

# -- SVG plots ------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _frame(name: str, title: str, body: list[str], legend: Sequence[str], y_label: str) -> Markup:
    """The plot's box, title, y label and legend (rows of three, under the x axis)."""
    items = "".join(
        f'<g transform="translate({PAD + 160 * (i % 3)},{H - 6 + 14 * (i // 3)})">'
        f'<rect width="10" height="10" y="-9" fill="{PALETTE[i % len(PALETTE)]}"/>'
        f'<text x="14" font-size="11">{escape(label)}</text></g>'
        for i, label in enumerate(legend)
    )
    height = H + 14 * max((len(legend) + 2) // 3 - 1, 0) + 4
    return Markup(
        f'<svg class="plot" data-plot="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{W}" height="{height}" viewBox="0 0 {W} {height}" role="img">'
        f"<title>{escape(title)}</title>"
        f'<text x="{PAD}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
        f'<text x="10" y="{H / 2}" font-size="11" transform="rotate(-90 10 {H / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>' + "".join(body) + items + "</svg>"
    )


def _axes(y_min: float, y_max: float, x_ticks: Sequence[tuple[float, str]]) -> list[str]:
    out = [
        f'<line x1="{PAD}" y1="{BOTTOM}" x2="{W - 10}" y2="{BOTTOM}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="28" x2="{PAD}" y2="{BOTTOM}" stroke="#333"/>',
    ]
    for i in range(5):
        v = y_min + (y_max - y_min) * i / 4
        y = _y(v, y_min, y_max)
        out.append(
            f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 10}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{PAD - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{_fmt(v)}</text>"
        )
    for x, label in x_ticks:
        out.append(
            f'<text x="{x:.1f}" y="{BOTTOM + 14}" font-size="10" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    return out


def _y(v: float, y_min: float, y_max: float) -> float:
    span = (y_max - y_min) or 1.0
    return BOTTOM - (v - y_min) / span * (BOTTOM - 28)


def _range(values: Sequence[float], floor: float | None = None, ceil: float | None = None):
    lo = min(values, default=0.0) if floor is None else floor
    hi = max(values, default=1.0) if ceil is None else ceil
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def line_chart(
    name: str,
    title: str,
    series: Mapping[str, Sequence[tuple[int, float]]],
    y_label: str,
    y_range: tuple[float, float] | None = None,
    reference: float | None = None,
    intervals: Mapping[str, Sequence[tuple[int, float, float]]] | None = None,
) -> Markup:
    """One line per series over rounds; points are drawn so a single round shows.
    `intervals`: per series, (round, low, high) drawn as error bars."""
    xs = sorted({x for points in series.values() for x, _ in points}) or [1]
    values = [v for points in series.values() for _, v in points]
    y_min, y_max = y_range or _range(values)

    def px(x: int) -> float:
        if len(xs) == 1:
            return (PAD + W) / 2
        return PAD + 20 + (x - xs[0]) / (xs[-1] - xs[0]) * (W - PAD - 50)

    body = _axes(y_min, y_max, [(px(x), f"round {x}") for x in xs])
    if reference is not None:
        y = _y(reference, y_min, y_max)
        body.append(
            f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 10}" y2="{y:.1f}" stroke="#888" '
            'stroke-dasharray="4 3"/>'
        )
    for i, (label, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = [(px(x), _y(v, y_min, y_max)) for x, v in sorted(points)]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        for x_round, lo, hi in (intervals or {}).get(label, []):
            x = px(x_round)
            y_lo, y_hi = _y(lo, y_min, y_max), _y(hi, y_min, y_max)
            body.append(
                f'<line x1="{x:.1f}" y1="{y_lo:.1f}" x2="{x:.1f}" y2="{y_hi:.1f}" '
                f'stroke="{color}" stroke-width="1.5"><title>{escape(label)}: 95% interval '
                f"{_fmt(lo)} to {_fmt(hi)}</title></line>"
            )
        for (x, y), (_, v) in zip(coords, sorted(points), strict=True):
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}">'
                f"<title>{escape(label)}: {_fmt(v)}</title></circle>"
            )
    return _frame(name, title, body, list(series), y_label)


def bar_chart(
    name: str,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Mapping[str, float]],
    y_label: str,
    y_range: tuple[float, float] | None = None,
    stacked: bool = False,
) -> Markup:
    """Bars per group (x) and series (colour), side by side or stacked."""
    totals = [sum(s.get(g, 0.0) for s in series.values()) for g in groups]
    values = totals if stacked else [v for s in series.values() for v in s.values()]
    y_min, y_max = y_range or _range(values, floor=0.0)
    slot = (W - PAD - 20) / max(len(groups), 1)
    body = _axes(y_min, y_max, [(PAD + slot * (i + 0.5), g) for i, g in enumerate(groups)])
    width = slot * 0.8 / (1 if stacked else max(len(series), 1))
    for gi, group in enumerate(groups):
        base = 0.0
        for si, (label, values_by_group) in enumerate(series.items()):
            v = values_by_group.get(group)
            if v is None:
                continue
            x = PAD + slot * gi + slot * 0.1 + (0 if stacked else si * width)
            top, bottom = _y(base + v, y_min, y_max), _y(base, y_min, y_max)
            body.append(
                f'<rect x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
                f'height="{max(bottom - top, 0.5):.1f}" fill="{PALETTE[si % len(PALETTE)]}">'
                f"<title>{escape(group)} {escape(label)}: {_fmt(v)}</title></rect>"
            )
            if stacked:
                base += v
    return _frame(name, title, body, list(series), y_label)


def histogram(
    name: str,
    title: str,
    samples: Mapping[str, Sequence[float]],
    bins: int,
    x_range: tuple[float, float],
) -> Markup:
    """Share of values per bin, one bar colour per sample set (e.g. per round)."""
    lo, hi = x_range
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    groups = [f"{_fmt(edges[i])}-{_fmt(edges[i + 1])}" for i in range(bins)]
    series: dict[str, dict[str, float]] = {}
    for label, values in samples.items():
        counts = [0] * bins
        for v in values:
            counts[min(max(int((v - lo) / (hi - lo) * bins), 0), bins - 1)] += 1
        total = max(len(values), 1)
        series[label] = {g: c / total for g, c in zip(groups, counts, strict=True)}
    return bar_chart(name, title, groups, series, "share of candidates", (0.0, 1.0))


# -- the page -----------------------------------------------------------------------------


def _by_round(evaluations: Sequence[Mapping[str, Any]], metric: str, method=None) -> dict:
    return {
        e["round"]: e
        for e in evaluations
        if e["metric"] == metric and e["method"] == method and e["value"] is not None
    }


def time_split(rounds: Sequence[Mapping], stages: Sequence[Mapping]) -> dict[int, dict]:
    """Per round: seconds per stage (work), engine start-up, the flow's own work (store
    reads and writes, engine shutdowns), and the rest of the round's wall time:
    orchestration (Prefect's task and flow-run machinery) and whatever else was not timed."""
    out: dict[int, dict[str, float]] = {}
    for r in rounds:
        if r["wall_s"] is None:
            continue
        parts: dict[str, float] = defaultdict(float)
        for s in stages:
            if s["round"] != r["round"]:
                continue
            key = "flow (store, engine stop)" if s["stage"] == "flow" else s["stage"]
            parts[key] += s["wall_s"]
            parts["engine start"] += s["setup_s"] or 0.0
        parts["orchestration"] = max(r["wall_s"] - sum(parts.values()), 0.0)
        out[r["round"]] = {"wall_s": r["wall_s"], **parts}
    return out


def build(data: Mapping[str, Any], run_id: str, db_path: str) -> dict[str, Any]:
    """The page's numbers and plots from `Store.report_data`."""
    evals = data["evaluations"]
    rounds = [r["round"] for r in data["rounds"]]
    methods = sorted({p["method"] for p in data["pairs"]})
    labels = [f"round {r}" for r in rounds]

    win = _by_round(evals, "win_rate")
    flip = _by_round(evals, "order_flip_rate")
    plots = {
        "win_rate": line_chart(
            "win_rate",
            "Win rate of M_t+1 over M_t (held-out prompts, fixed judge)",
            {
                "win rate": [(r, e["value"]) for r, e in win.items()],
                "order-flip rate": [(r, e["value"]) for r, e in flip.items()],
            },
            "rate",
            (0.0, 1.0),
            reference=0.5,
        ),
    }
    stick: dict[str, list[tuple[int, float]]] = defaultdict(list)
    bars: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for metric, label in YARDSTICK:
        for r, e in _by_round(evals, metric).items():
            lo, hi = json.loads(e["details_json"])["ci95"]
            stick[label].append((r, e["value"]))
            bars[label].append((r, lo, hi))
    if stick:
        plots["yardstick"] = line_chart(
            "yardstick",
            "Held-out instruction-following accuracy of M_t (checked by code; 95% intervals)",
            stick,
            "accuracy",
            (0.0, 1.0),
            intervals=bars,
        )
    scores: dict[str, list[float]] = defaultdict(list)
    for s in data["scores"]:
        scores[f"round {s['round']}"].append(s["mean_score"])
    top = max((max(v) for v in scores.values()), default=5.0)
    plots["scores"] = histogram(
        "scores",
        "Self-judge scores of Self-Rewarding candidates",
        scores,
        10,
        (0.0, max(5.0, top)),
    )
    length: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for m in methods:
        for r, e in _by_round(evals, "length_ratio", m).items():
            details = json.loads(e["details_json"])
            length[f"{m} chosen"].append((r, details["chosen_chars"]))
            length[f"{m} rejected"].append((r, details["rejected_chars"]))
    for r, e in _by_round(evals, "heldout_chars").items():
        length["held-out answers of M_t+1"].append((r, e["value"]))
    plots["length"] = line_chart(
        "length", "Answer length by round (characters)", length, "mean characters"
    )
    agreement: dict[str, dict[str, float]] = defaultdict(dict)
    groups = []
    for labeler in ("pairwise", "self_judge"):
        for m in methods:
            found = _by_round(evals, f"agreement_{labeler}", m)
            if found:
                group = f"{m}/{'self' if labeler == 'self_judge' else 'pair'}"
                groups.append(group)
                for r, e in found.items():
                    agreement[f"round {r}"][group] = e["value"]
    plots["agreement"] = bar_chart(
        "agreement",
        "Agreement with the method's label (pair: pairwise judge, self: self-judge)",
        groups,
        agreement,
        "agreement",
        (0.0, 1.0),
    )
    comparisons = judge_comparisons(evals)
    plots["judges"] = bar_chart(
        "judges",
        "Two judges on the same candidates: how often they agree",
        [c["label"] for c in comparisons],
        {
            name.replace("_", " "): {
                c["label"]: c[name] for c in comparisons if c[name] is not None
            }
            for name in ("pair_agreement", "same_best", "same_worst")
        },
        "share",
        (0.0, 1.0),
    )
    split = time_split(data["rounds"], data["stages"])
    parts = sorted({k for s in split.values() for k in s if k != "wall_s"})
    plots["time"] = bar_chart(
        "time",
        "Where each round's wall time goes (seconds)",
        [f"round {r}" for r in split],
        {p: {f"round {r}": s.get(p, 0.0) for r, s in split.items()} for p in parts},
        "seconds",
        stacked=True,
    )

    table = []
    for r in data["rounds"]:
        n = r["round"]
        pairs = {p["method"]: p["n"] for p in data["pairs"] if p["round"] == n}
        row = {
            "round": n,
            "model": r["model_id"],
            "status": r["status"],
            "pairs": ", ".join(f"{m} {c}" for m, c in pairs.items()) or "none",
            "win_rate": win.get(n, {}).get("value"),
            "flip_rate": flip.get(n, {}).get("value"),
            "implicit_reward_accuracy": _by_round(evals, "implicit_reward_accuracy")
            .get(n, {})
            .get("value"),
            "implicit_reward_margin": _by_round(evals, "implicit_reward_margin")
            .get(n, {})
            .get("value"),
            "wall_s": r["wall_s"],
        }
        if n in split and r["wall_s"]:
            row["orchestration_share"] = split[n]["orchestration"] / r["wall_s"]
        table.append(row)
    strict = _by_round(evals, "ifeval_prompt_strict")
    for row in table:
        row["ifeval"] = strict.get(row["round"], {}).get("value")
    base = strict.get(0)
    if base is not None and table:  # the initial model's, as round 0
        first = dict.fromkeys(set(table[0]) - {"orchestration_share"}, None)
        first.update(round=0, status="initial", pairs="-", ifeval=base["value"])
        first["model"] = json.loads(base["details_json"])["model"]
        table.insert(0, first)
    per_method: dict[tuple[int, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for e in evals:
        if e["method"] is not None and not e["metric"].startswith("judge_"):
            per_method[(e["round"], e["method"])][e["metric"]] = e
    return {
        "run_id": run_id,
        "db_path": db_path,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": labels,
        "table": table,
        "per_method": dict(sorted(per_method.items())),
        "method_metrics": METHOD_METRICS,
        "split": split,
        "plots": plots,
        "judge_comparisons": comparisons,
        "instruction_kinds": instruction_kinds(evals),
        "training": training_steps(data.get("training", [])),
    }


# The yardstick's metrics and their labels (round 0 is the run's initial model).
YARDSTICK = (
    ("ifeval_prompt_strict", "prompt-level strict"),
    ("ifeval_prompt_loose", "prompt-level loose"),
    ("ifeval_instruction_strict", "instruction-level strict"),
    ("ifeval_instruction_loose", "instruction-level loose"),
    ("ifeval_on_topic", "answers on topic"),
    ("ifeval_prompt_strict_on_topic", "prompt-level strict and on topic"),
)

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
        for t, e in sorted(_by_round(evaluations, "ifeval_instruction_strict").items())
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


def judge_comparisons(evaluations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (round, judge a, judge b) that `prefloop judge` compared."""
    found: dict[tuple, dict[str, Any]] = {}
    for e in evaluations:
        if e["metric"] != "judge_pair_agreement":
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


def write_report(db_path: Path | str, run_id: str, out: Path | str) -> Path:
    """Write the run's report; returns its path. Reads the store read-only."""
    with Store(db_path, read_only=True) as store:
        data = store.report_data(run_id)
    if not data["rounds"]:
        raise StoreError(f"{db_path}: run {run_id!r} has no rounds to report")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(render(build(data, run_id, str(db_path))), encoding="utf-8")
    tmp.replace(out)
    return out
