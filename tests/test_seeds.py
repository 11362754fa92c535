import json
from pathlib import Path

import pytest
from helpers import prefloop

from pipeline.config import RunConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.rounds import load_inputs
from pipeline.seeds import load_prompt_file


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def test_prompt_and_messages_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "hi"}\n\n'
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}\n'
    )
    assert load_prompt_file(path) == [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a"}\n{"prompt": "b"\n', r"p\.jsonl:2: invalid JSON"),
        (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"p\.jsonl:2: not UTF-8"),
        (b'{"prompt": 3}\n', r"p\.jsonl:1: 'prompt' must be a non-empty string"),
        (
            b'{"messages": [{"role": "assistant", "content": "x"}]}\n',
            r"p\.jsonl:1: the last message",
        ),
        (b"[1, 2]\n", r"p\.jsonl:1: expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_prompt_file(path)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="prompts file not found"):
        load_prompt_file(tmp_path / "none.jsonl")


# -- prompts from `datasets` ------------------------------------------------------------------

CHAT = [
    [{"role": "user", "content": "Plan a picnic."}, {"role": "assistant", "content": "Sure."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": "A wren."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "A kite."},
    ],
]


def dataset_files(tmp: Path) -> dict[str, Path]:
    """One prompt set in each form `datasets` reads: a parquet file (a `prompt` column), a
    jsonl chat file (`messages`, answers included) and a save_to_disk folder (a split
    `test`, the text in `instruction`)."""
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"prompt": ["Explain tides.", "Why is the sky blue?"]}).to_parquet(
        tmp / "uf.parquet"
    )
    (tmp / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHAT))
    split = Dataset.from_dict(
        {"instruction": [f"Write line {i} of a poem." for i in range(5)], "output": ["x"] * 5}
    )
    DatasetDict({"test": split}).save_to_disk(str(tmp / "saved"))
    return {"parquet": tmp / "uf.parquet", "jsonl": tmp / "chat.jsonl", "disk": tmp / "saved"}


def _datasets_config(tmp: Path, *entries: dict) -> RunConfig:
    prompts = {"files": [], "datasets": list(entries)}
    return RunConfig(db_path=tmp / "db.duckdb", runs_dir=tmp / "runs", prompts=prompts)


def test_prompts_from_parquet_jsonl_and_a_saved_dataset(tmp_path):
    """Each form gives its prompts with their source; a chat row is cut after its last user
    turn; `limit` keeps the first rows, `task` names them all."""
    files = dataset_files(tmp_path)
    cfg = _datasets_config(
        tmp_path,
        {"path": str(files["parquet"])},
        {"path": str(files["jsonl"]), "messages_column": "messages"},
        {
            "path": str(files["disk"]),
            "split": "test",
            "column": "instruction",
            "limit": 3,
            "task": "helpfulness",
        },
    )
    inputs = load_inputs(cfg)
    got = {(p.source, p.text): p for p in inputs.train_prompts}
    assert set(got) == {
        ("uf.parquet:train", "Explain tides."),
        ("uf.parquet:train", "Why is the sky blue?"),
        ("chat.jsonl:train", "Plan a picnic."),
        ("chat.jsonl:train", "Another?"),
        *(("saved:test", f"Write line {i} of a poem.") for i in range(3)),
    }
    assert got[("chat.jsonl:train", "Another?")].conversation == CHAT[1][:4]
    assert got[("chat.jsonl:train", "Plan a picnic.")].conversation == CHAT[0][:1]
    assert {p.task for p in inputs.train_prompts if p.source == "saved:test"} == {"helpfulness"}
    # The same prompt from a file and from a dataset is one prompt (its id is its messages).
    both = _datasets_config(tmp_path, {"path": str(files["parquet"])})
    both.prompts.files = [write_prompts(tmp_path / "p.jsonl", ["Explain tides."])]
    assert load_inputs(both).duplicate_prompts == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"split": "validation"}, "no split 'validation'; it has test"),
        (
            {"split": "test", "column": "question"},
            "no column 'question'; it has instruction, output",
        ),
        (
            {"split": "test"},
            "no column 'prompt' or 'messages' (name one with column or "
            "messages_column); it has instruction, output",
        ),
        (
            {"split": "test", "messages_column": "output"},
            "row 0: messages must be a non-empty list",
        ),
    ],
)
def test_a_bad_dataset_entry_is_one_line(tmp_path, entry, message):
    files = dataset_files(tmp_path)
    cfg = _datasets_config(tmp_path, {"path": str(files["disk"]), **entry})
    with pytest.raises(ConfigError) as e:
        load_inputs(cfg)
    assert str(e.value).startswith(f"prompts.datasets[0] ({files['disk']}): ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_dataset_entry_names_one_column(tmp_path):
    with pytest.raises(ConfigError, match="give column or messages_column, not both"):
        parse_config(
            {"prompts": {"datasets": [{"path": "x", "column": "a", "messages_column": "b"}]}}
        )


@pytest.mark.slow
def test_prefloop_prompts_lists_a_rounds_draw(tmp_path):
    """`prefloop prompts` (a subprocess, as a user runs it): the counts per source and the
    round's draw, each prompt with its source."""
    files = dataset_files(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "prompts": {
                    "files": ["data/prompts/helpful.jsonl"],
                    "datasets": [{"path": str(files["parquet"])}],
                    "per_round": 4,
                },
            }
        )
    )
    out = prefloop("prompts", "--config", config, "--round", "2", "--limit", "3")
    assert out.returncode == 0, out.stderr
    head, draw, *rows = out.stdout.splitlines()
    assert "2 from uf.parquet:train" in head and "from helpful.jsonl" in head, head
    assert draw == "round 2 draws 4, the first 3:"
    assert len(rows) == 3 and all(
        r.split()[0] in ("helpful.jsonl", "uf.parquet:train") for r in rows
    )
