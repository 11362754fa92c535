"""The HTML report: built from a store, self-contained, and drawn by a real browser."""

import json
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import ROOT

from pipeline.errors import StoreError
from pipeline.report import time_split, write_report
from pipeline.store import Store

PLOTS = {"win_rate", "scores", "length", "agreement", "time"}  # no judges compared
PLAN = {"stages": [["self_reward", 1], ["train_dpo", 1]], "pid": 1}


def _eval(round_, metric, value, method=None, **details):
    return {
        "evaluation_id": f"{round_}-{metric}-{method}",
        "run_id": "r",
        "round": round_,
        "metric": metric,
        "method": method,
        "value": value,
        "details_json": json.dumps(details),
    }


@pytest.fixture
def store_path(tmp_path) -> Path:
    """Two finished rounds written by hand, with known numbers."""
    path = tmp_path / "db.duckdb"
    start = datetime(2026, 1, 1)
    rows = {
        "rounds": [
            {
                "run_id": "r",
                "round": t,
                "model_id": f"m{t}<b>",
                "status": "finished",
                "started_at": start,
                "finished_at": start + timedelta(seconds=100),
                "plan_json": json.dumps(PLAN),
            }
            for t in (1, 2)
        ],
        "stage_metrics": [
            {
                "run_id": "r",
                "round": t,
                "stage": s,
                "batch": 0,
                "n_items": 1,
                "wall_s": w,
                "setup_s": su,
            }
            for t in (1, 2)
            for s, w, su in (
                ("self_reward", 50.0, 10.0),
                ("train_dpo", 30.0, 0.0),
                ("flow", 2.0, 0.0),
            )
        ],
        "judgments": [
            {
                "judgment_id": f"j{i}",
                "run_id": "r",
                "round": 1 + i % 2,
                "method": "self_reward",
                "generation_id": f"g{i}",
                "sample_idx": 0,
                "model_id": "m",
                "template_id": "t",
                "raw_output": "",
                "score": float(i % 5),
                "parse_status": "ok",
                "sampling_json": "{}",
                "seed": 0,
            }
            for i in range(10)
        ],
        "pairs": [
            {
                "pair_id": f"p{t}{m}",
                "run_id": "r",
                "round": t,
                "method": m,
                "prompt_id": "x",
                "chosen_generation_id": "a",
                "rejected_generation_id": "b",
                "model_id": "m",
            }
            for t in (1, 2)
            for m in ("self_reward", "rlcd")
        ],
        "evaluations": [
            _eval(1, "win_rate", 0.625, wins=5, ties=0, losses=3),
            _eval(2, "win_rate", 0.75, wins=6, ties=0, losses=2),
            _eval(1, "order_flip_rate", 0.25),
            _eval(2, "order_flip_rate", 0.0),
            _eval(1, "implicit_reward_accuracy", 0.5),
            _eval(1, "heldout_chars", 120.0),
            _eval(1, "length_ratio", 1.5, "rlcd", chosen_chars=150.0, rejected_chars=100.0),
            _eval(2, "length_ratio", 1.2, "rlcd", chosen_chars=120.0, rejected_chars=100.0),
            _eval(1, "agreement_pairwise", 0.8, "rlcd"),
            _eval(2, "agreement_self_judge", 0.6, "rlcd"),
            _eval(1, "tie_rate", 0.125, "self_reward"),
            _eval(1, "pairs", 7.0, "rlcd"),
        ],
    }
    with Store(path) as store:
        store.write(rows)
    return path


def test_time_split_leaves_the_rest_to_orchestration():
    plan = {"stages": [["self_reward", 1], ["rlcd", 1], ["train_sft", 1], ["train_dpo", 1]]}
    rounds = [{"round": 1, "wall_s": 100.0, "plan_json": json.dumps(plan)}]
    stages = [
        {"round": 1, "stage": "flow", "wall_s": 5.0, "setup_s": None},
        {"round": 1, "stage": "train_dpo", "wall_s": 6.0, "setup_s": None},
        {"round": 1, "stage": "rlcd", "wall_s": 50.0, "setup_s": 20.0},
        {"round": 1, "stage": "train_sft", "wall_s": 4.0, "setup_s": None},
    ]
    split = time_split(rounds, stages)[1]
    assert split["rlcd"] == 50.0 and split["engine start"] == 20.0
    assert split["flow (store, engine stop)"] == 5.0
    assert split["orchestration"] == pytest.approx(15.0)
    # The round's stored plan orders its stages; what is not in the plan comes after.
    assert list(split)[1:5] == ["rlcd", "train_sft", "train_dpo", "flow (store, engine stop)"]


def test_report_sections_numbers_and_escaping(store_path, tmp_path):
    page = write_report(store_path, "r", tmp_path / "out" / "report.html")
    html = page.read_text()
    for section in ("key-numbers", "win-rate", "scores", "length", "agreement", "time"):
        assert f'id="{section}"' in html
    assert "0.625" in html and "0.750" in html  # win rates in the key-numbers table
    assert "m1&lt;b&gt;" in html and "m1<b>" not in html  # stored text is escaped
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # nothing fetched from elsewhere
    assert "plotsRendered" not in html and "getBBox" not in html  # no script for a test
    # engine start 10 + stages 82 = 92 of 100 s: orchestration 8%
    assert "8.00%" in html
    assert ">7</td>" in html and "7.000" not in html  # a count prints as a count
    assert set(re.findall(r'<svg class="plot" data-plot="([^"]+)"', html)) == PLOTS
    again = write_report(store_path, "r", tmp_path / "again.html").read_text()
    stamp = re.compile(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert stamp.sub("", again) == stamp.sub("", html)  # the same data draws the same page


@pytest.mark.slow
def test_the_report_is_drawn_by_a_browser(store_path, tmp_path, chromium):
    """Chromium parses every chart into its DOM, and its screenshot has each chart's
    colours on it (matplotlib's first series colour, C0, in every chart)."""
    from PIL import Image

    page = write_report(store_path, "r", tmp_path / "out" / "report.html")
    dom = chromium.dom(page, tmp_path / "dom")
    assert set(re.findall(r'<svg class="plot" data-plot="([^"]+)"', dom)) == PLOTS
    png = chromium.screenshot(page, tmp_path / "shot", size="1200,4000")
    image = Image.open(png).convert("RGB")
    blue = sum(
        1
        for r, g, b in image.getdata()
        if abs(r - 0x1F) < 24 and abs(g - 0x77) < 24 and abs(b - 0xB4) < 24
    )
    assert blue > 2000, blue  # lines, markers and bars drawn, not just an empty frame


@pytest.mark.slow
def test_report_cli_and_errors(store_path, tmp_path):
    out = tmp_path / "cli.html"
    cmd = [sys.executable, "-m", "flows.cli", "report", "--db", str(store_path)]
    ok = subprocess.run(
        [*cmd, "--run", "r", "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and str(out) in ok.stdout
    missing = subprocess.run([*cmd, "--run", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {store_path}: run 'nope' has no rounds to report"
    with pytest.raises(StoreError, match="no database here yet"):
        write_report(tmp_path / "absent.duckdb", "r", out)


def _explored(path: Path) -> Path:
    """A finished round of four pairs over two methods, with everything the explorer
    opens: judgments with raw output, an RLCD descriptor, a CAI critique, an A/B
    question, a discard, and an answer that tries to close the page's script."""
    run, rows = "x", {k: [] for k in ("prompts", "generations", "pairs", "judgments")}
    rows.update(critiques=[], comparisons=[], discards=[])
    for i, method in enumerate(("rlcd", "rlcd", "cai", "self_reward")):
        pid, gids = f"p{i}", [f"g{i}a", f"g{i}b"]
        text = f"Question {i}?"
        rows["prompts"].append(
            {"run_id": run, "prompt_id": pid, "round": 1, "source": "seed", "text": text,
             "messages_json": json.dumps([{"role": "user", "content": text}])}
        )  # fmt: skip
        for k, gid in enumerate(gids):
            answer = (
                "</script><script>document.title='owned'</script>" if i == 3 else f"answer {i}{k}"
            )
            meta = {"descriptor": "harmless, helpful"} if method == "rlcd" and k == 0 else None
            rows["generations"].append(
                {"generation_id": gid, "run_id": run, "round": 1, "method": method,
                 "prompt_id": pid, "model_id": "m@1", "role": "r", "sample_idx": k,
                 "text": answer, "n_tokens": 3, "finish_reason": "stop", "sampling_json": "{}",
                 "seed": 0, "meta_json": json.dumps(meta) if meta else None}
            )  # fmt: skip
            rows["judgments"].append(
                {"judgment_id": f"j{gid}", "run_id": run, "round": 1, "method": method,
                 "generation_id": gid, "sample_idx": 0, "model_id": "m@1", "judge_id": "judge@7",
                 "template_id": "judge@7", "raw_output": f"Score: {2 - k}", "score": 2.0 - k,
                 "parse_status": "ok", "sampling_json": "{}", "seed": 0}
            )  # fmt: skip
        rows["pairs"].append(
            {"pair_id": f"pair{i}", "run_id": run, "round": 1, "method": method, "variant": "v",
             "prompt_id": pid, "chosen_generation_id": gids[0], "rejected_generation_id": gids[1],
             "margin": float(i), "model_id": "m@1"}
        )  # fmt: skip
    rows["critiques"].append(
        {"critique_id": "c2", "run_id": run, "round": 1, "prompt_id": "p2", "step": 0,
         "principle_id": "harm", "input_generation_id": "g2b", "critique": "Too curt.",
         "revision_generation_id": "g2a", "model_id": "m@1", "template_id": "t@1"}
    )  # fmt: skip
    rows["comparisons"].append(
        {"comparison_id": "q0", "run_id": run, "round": 1, "method": "rlcd", "prompt_id": "p0",
         "generation_a_id": "g0a", "generation_b_id": "g0b", "model_id": "m@1",
         "template_id": "choice@1", "prob_a": 0.75}
    )  # fmt: skip
    rows["discards"].append(
        {"run_id": run, "round": 1, "method": "self_reward", "stage": "pairs", "item_id": "p9",
         "reason": "tie", "detail": "scores 3.0 and 3.0"}
    )  # fmt: skip
    rows["rounds"] = [{"run_id": run, "round": 1, "model_id": "m@1", "status": "finished"}]
    with Store(path) as store:
        store.write(rows)
    return path


def test_the_pairs_explorer_carries_every_pair_and_what_made_it(tmp_path):
    page = write_report(_explored(tmp_path / "db.duckdb"), "x", tmp_path / "r.html")
    html = page.read_text()
    assert 'id="pairs"' in html
    raw = re.search(r'<script type="application/json" id="pairs-data">(.*?)</script>', html, re.S)
    data = json.loads(raw.group(1))
    assert [p["id"] for p in data["pairs"]] == ["pair2", "pair0", "pair1", "pair3"]
    rlcd = next(p for p in data["pairs"] if p["id"] == "pair0")
    assert rlcd["chosen"]["meta"] == {"descriptor": "harmless, helpful"}
    assert rlcd["chosen"]["judgments"][0] == {
        "judge": "judge@7", "score": 2.0, "status": "ok", "raw": "Score: 2"
    }  # fmt: skip
    assert rlcd["questions"][0]["prob_a"] == 0.75
    cai = next(p for p in data["pairs"] if p["id"] == "pair2")
    assert cai["critiques"] == [
        {"step": 0, "principle": "harm", "critique": "Too curt.", "revision": "g2a"}
    ]
    assert data["discards"][0]["reason"] == "tie" and data["discards"][0]["count"] == 1
    assert "</script><script>document.title" not in html  # generated text stays data
    assert data["note"] == {"total": 4, "shown": 4, "sampled": False}


def test_past_its_size_the_explorer_carries_a_stated_sample():
    from pipeline.explorer import sample

    pairs = [{"pair_id": f"{i:03d}", "round": 1 + i % 2, "method": "m"} for i in range(10)]
    kept, note = sample(pairs, 4)
    assert note == {"total": 10, "shown": 4, "sampled": True, "per_group": 2}
    assert [p["pair_id"] for p in kept] == ["000", "002", "001", "003"]


@pytest.mark.slow
def test_the_explorer_filters_and_opens_a_pair_in_a_browser(tmp_path, chromium):
    """The page's state is in its address: a method filter narrows the list, `open`
    shows the pair with both answers, its judge's raw output and its descriptor."""
    page = write_report(_explored(tmp_path / "db.duckdb"), "x", tmp_path / "r.html")
    dom = chromium.dom(page, tmp_path / "all")
    assert 'data-shown="4"' in dom
    view = "pairs?method=rlcd&open=pair0"
    dom = chromium.dom(page, tmp_path / "rlcd", fragment=view)
    assert 'data-shown="2"' in dom and dom.count('<tr data-pair="') == 2
    detail = dom[dom.index('id="pair-detail"') :]
    assert 'data-pair="pair0"' in detail[:200]
    assert "answer 00" in detail and "answer 01" in detail and "Score: 2" in detail
    assert "harmless, helpful" in detail
    assert "<title>prefloop report: x</title>" in dom  # the injected script never ran
    png = chromium.screenshot(page, tmp_path / "shot", size="1200,2600", fragment=view)
    assert png.stat().st_size > 10_000
