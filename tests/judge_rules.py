"""Rule-based judge functions the tests name as `judge_rules:<function>` (tests/ is on
sys.path under pytest; subprocesses get it through PYTHONPATH)."""


def word_count(prompt: str, answer: str) -> float:
    return float(len(answer.split()))


def has_digit(prompt: str, answer: str) -> bool:
    return any(ch.isdigit() for ch in answer)


def undecided(prompt: str, answer: str) -> None:
    return None


def wrong_type(prompt: str, answer: str) -> str:
    return "high"


def raises(prompt: str, answer: str) -> float:
    raise KeyError(f"no rule for {prompt[:20]!r}")
