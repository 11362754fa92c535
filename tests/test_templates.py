import pytest

from pipeline.errors import TemplateError
from pipeline.templates import TemplateLibrary

SHIPPED = TemplateLibrary().names()


@pytest.fixture
def user_dir(tmp_path):
    return tmp_path


def _write(d, name, text):
    (d / f"{name}.j2").write_text(text)
    return TemplateLibrary([d])


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_template_loads_and_renders(name):
    t = TemplateLibrary().get(name)
    # `examples` is a list (self-instruct's shots); every other variable is text.
    values = {v: [f"<{v}>"] if v == "examples" else f"<{v}>" for v in t.meta.variables}
    text = t.render(**values)
    for v in t.meta.variables:
        assert f"<{v}>" in text
    assert "{#" not in text  # front matter never reaches the model
    assert len(t.sha256) == 64 and t.template_id.startswith(f"{name}@")


def test_judge_templates_declare_parsers():
    lib = TemplateLibrary()
    assert lib.get("judge_additive_5pt").meta.parser.kind == "score"
    assert lib.get("choice_ab").meta.parser.labels == ["A", "B"]


def test_missing_variable(user_dir):
    lib = _write(user_dir, "t", "{#---\nvariables: [a, b]\n---#}\n{{ a }} {{ b }}")
    with pytest.raises(TemplateError, match=r"t\.j2: missing variable 'b'"):
        lib.get("t").render(a="x")


def test_undeclared_variable_is_caught_at_load(user_dir):
    lib = _write(user_dir, "t", "{#---\nvariables: [a]\n---#}\n{{ a }} {{ c }}")
    with pytest.raises(TemplateError, match="uses variable 'c'"):
        lib.get("t")


def test_syntax_error_names_file_and_line(user_dir):
    lib = _write(user_dir, "t", "{#---\nvariables: [a]\n---#}\nline\n{% if a %}unclosed")
    with pytest.raises(TemplateError, match=r"t\.j2:5: template syntax error"):
        lib.get("t")


@pytest.mark.parametrize(
    "body",
    [
        "{{ a.__class__.__mro__[1].__subclasses__() }}",
        "{{ a.__init__.__globals__ }}",
        "{{ ''.__class__ }}",
        "{{ a.format.__self__ }}",
    ],
)
def test_sandbox_blocks_escapes(user_dir, body):
    lib = _write(user_dir, "t", "{#---\nvariables: [a]\n---#}\n" + body)
    with pytest.raises(TemplateError, match="sandbox|unsafe"):
        lib.get("t").render(a="x")


def test_generated_text_stays_literal(user_dir):
    lib = _write(user_dir, "t", "{#---\nvariables: [a]\n---#}\n[{{ a }}]")
    assert lib.get("t").render(a="{{ 7 * 7 }} {% if x %}") == "[{{ 7 * 7 }} {% if x %}]"


def test_bad_parser_declaration(user_dir):
    lib = _write(
        user_dir,
        "t",
        "{#---\nparser: {kind: score, pattern: 'Score: \\d', min: 0, max: 5}\n---#}\nx",
    )
    with pytest.raises(TemplateError, match="exactly one capture group"):
        lib.get("t")


def test_user_dir_shadows_and_path_works(user_dir):
    lib = _write(user_dir, "choice_ab", "{#---\nvariables: []\n---#}\nmine")
    assert lib.get("choice_ab").render() == "mine"
    direct = TemplateLibrary().get(user_dir / "choice_ab.j2")
    assert direct.render() == "mine"


def test_unknown_template_name():
    with pytest.raises(TemplateError, match="not found"):
        TemplateLibrary().get("no_such_template")
