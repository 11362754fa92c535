import pytest

from pipeline.errors import ConfigError
from pipeline.seeds import load_prompt_file


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
