"""The code's shape as a spec: short functions, one way in for shared test code, and the
pages generated from the code kept in step with it."""

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

from pipeline import reference

MAX_FUNCTION_LINES = 60
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _functions(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                yield f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - first + 1


def test_no_function_in_the_library_or_the_flows_is_over_60_lines():
    found = [(name, n) for folder in ("pipeline", "flows") for name, n in _functions(folder)]
    assert len(found) > 300  # the walk saw the code
    longest = sorted(found, key=lambda f: -f[1])[:3]
    assert longest[0][1] <= MAX_FUNCTION_LINES, longest


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_tests_share_code_through_helpers_only():
    """A test module never imports another (or conftest); bench/ imports nothing of tests/."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    assert len(tests) > 20
    for path in tests:
        bad = {n for n in _imports(path) if n.startswith("test_") or n == "conftest"}
        assert not bad, (path.name, bad)
    for path in sorted((ROOT / "bench").glob("*.py")):
        bad = {n for n in _imports(path) if n in ("tests", "helpers", "conftest")}
        bad |= {n for n in _imports(path) if n.startswith("test_")}
        assert not bad, (path.name, bad)


def test_the_configuration_reference_is_current():
    """docs/configuration.md is what `prefloop docs` makes from the models now: every key,
    its type, its default and one line of meaning."""
    page = reference.config_reference()
    assert (ROOT / "docs" / "configuration.md").read_text() == page, "run `prefloop docs`"
    rows = [r for r in page.splitlines() if r.startswith("| `")]
    assert len(rows) > 150
    assert not [r for r in rows if r.rstrip().endswith("|  |")], "a key without a meaning"
    for key in ("training.steps", "self_reward.judge", "evaluation.yardstick.prompts"):
        assert f"| `{key}` |" in page, key


def test_the_experiment_tables_are_generated_from_the_kept_results():
    page = (ROOT / "docs" / "experiments.md").read_text()
    assert reference.experiments_page(page) == page, "run `prefloop docs`"
    runs = len((ROOT / "bench" / "results" / "improvement.jsonl").read_text().splitlines())
    table = page[page.index(reference.BEGIN) : page.index(reference.END)]
    assert len(set(re.findall(r"^\| (\d+) \| ", table, re.M))) == runs


def test_the_experiment_tables_show_other_splits_and_each_methods_label_agreement():
    split = {"accuracy": 0.30, "accuracy_ci95": [0.25, 0.35], "strict_on_topic": 0.28}
    better = {"accuracy": 0.45, "accuracy_ci95": [0.40, 0.50], "strict_on_topic": 0.41}
    checkers = {"by_method": {"rlcd": {"better": 20, "tied": 30, "worse": 14}}}
    record = {
        "loop": "rlcd",
        "seed": 1,
        "rounds": {
            "0": {"splits": {"unseen": split}},
            "1": {"splits": {"unseen": split}, "checkers": checkers},
            "3": {"splits": {"unseen": better}},
        },
    }
    assert reference.split_table([record])[2] == (
        "| 1 | rlcd | 1 | unseen | 0.300 | 0.300 | - | 0.450 [0.400, 0.500] | +15.0 pt (M_3) "
        "| apart, better | 0.410 |"
    )
    worse = {"0": {"splits": {"unseen": better}}, "1": {"splits": {"unseen": split}}}
    assert (
        "| -15.0 pt (M_1) | apart, worse |"
        in reference.split_table([{**record, "rounds": worse}])[2]
    )
    assert reference.agreement_table([record])[2] == "| 1 | rlcd | 1 | rlcd | 20/30/14 | - | - |"


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert len(DOCS) >= 10
    for page in DOCS:
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_point_at_files_that_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
    assert "../shared" not in text
