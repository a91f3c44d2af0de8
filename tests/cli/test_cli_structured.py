"""`mistral7b generate --json-schema FILE / --grammar FILE`: real runs on the default model;
bad files end with one error line naming the file and the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from cli_helpers import assert_user_error, run_cli

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0,
                                      "maximum": 100_000_000}}}


def test_json_schema_file(tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    result = run_cli("generate", "The largest city in France, as JSON:", "--json-schema",
                     str(schema), "-n", "60", "--temperature", "0.8", "--seed", "1", "-q")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), CITY)


@pytest.mark.parametrize("name, text, pattern", [
    ("answer.lark", 'start: "yes" | "no"', "yes|no"),
    ("answer.gbnf", 'root ::= ("red" | "green") ", " ("cat" | "dog")', "(red|green), (cat|dog)"),
])
def test_grammar_file_lark_or_gbnf(tmp_path, name, text, pattern):
    grammar = tmp_path / name
    grammar.write_text(text)
    result = run_cli("generate", "Answer:", "--grammar", str(grammar), "-n", "10", "--json",
                     "-q")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert re.fullmatch(pattern, out["text"]) and out["finish_reason"] == "stop"


@pytest.mark.parametrize("name, text, words", [
    ("bad.json", '{"type": "objectx"}', ["bad.json", "JSON schema", "objectx"]),
    ("broken.json", '{"type": ', ["broken.json", "not valid JSON"]),
    ("bad.lark", "start: missing_rule", ["bad.lark", "grammar", "missing_rule"]),
    ("bad.gbnf", "root ::= (", ["bad.gbnf", "GBNF"]),
])
def test_a_bad_file_is_one_error_line(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    flag = "--json-schema" if name.endswith(".json") else "--grammar"
    assert_user_error(run_cli("generate", "hi", flag, str(path), "-n", "2"), *words)


def test_schema_and_grammar_together_are_refused(tmp_path):
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "g.lark").write_text('start: "a"')
    assert_user_error(run_cli("generate", "hi", "--json-schema", str(tmp_path / "s.json"),
                              "--grammar", str(tmp_path / "g.lark")), "not both")


def test_chat_answers_under_a_schema(tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(CITY))
    result = run_cli("chat", "--json-schema", str(schema), "-n", "60",
                     input="Name the largest city in France.\n")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), CITY)
