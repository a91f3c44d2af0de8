"""Structured output through the one step loop: every sampled completion follows its schema
or grammar (checked with jsonschema / re, not with our code), on a random model with
Mistral's v3 SentencePiece vocabulary and on the default model (GGUF byte-level BPE);
rows of one batch keep their own constraints; logit_bias."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from tiny_models import mistral_v3_folder

import mistral7b
from mistral7b.errors import InputError
from mistral7b.request import GenerationRequest
from mistral7b.sampling import SamplingParams
from mistral7b.scheduler import Scheduler

# Bounded on purpose: a random model never "wants" to close a string, so only a schema whose
# every path ends within max_tokens can promise that all 200 samples complete. (A bounded
# "number" is not enough: 1.000000... may run on.)
PERSON = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "member", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
        "score": {"enum": [0, 0.5, 1, None]},
    },
}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
SAMPLES = 200


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return mistral7b.load(mistral_v3_folder(tmp_path_factory.mktemp("v3")))


@pytest.fixture(scope="module")
def default():
    return mistral7b.load("default")


@pytest.fixture(params=["v3", "default"])
def llm(request):
    return request.getfixturevalue(request.param)


def test_200_samples_under_a_json_schema_all_validate(llm):
    torch.manual_seed(0)        # unseeded rows draw from the global generator, in row order
    outs = llm.generate(["A person as JSON:"] * SAMPLES, temperature=1.0, max_tokens=80,
                        response_format=AS_SCHEMA)
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)
        assert out.finish_reason == "stop"        # EOS is allowed once the object is complete
    assert len({o.text for o in outs}) > SAMPLES // 4    # really sampled, not one answer


def test_sampling_filters_stay_inside_the_schema(v3):
    torch.manual_seed(1)
    for sampling in ({"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.2, "temperature": 1.5},
                     {"repetition_penalty": 1.3, "frequency_penalty": 1.0}):
        outs = v3.generate(["x"] * 20, max_tokens=80, response_format=AS_SCHEMA,
                           **{"temperature": 1.0, **sampling})
        for out in outs:
            jsonschema.validate(json.loads(out.text), PERSON)


@pytest.mark.parametrize("llm, samples, finished", [("v3", SAMPLES, 0.05),
                                                    ("default", 100, 0.5)], indirect=["llm"])
def test_json_object_mode(llm, samples, finished):
    """json_object is unbounded (a string may run on): every sample is a complete JSON object
    ended by EOS, or was cut by max_tokens; none ends early. The random model rarely closes
    its strings; the default model mostly does."""
    torch.manual_seed(2)
    outs = llm.generate(["Describe a cat as a JSON object:"] * samples, temperature=1.0,
                        max_tokens=80, response_format={"type": "json_object"})
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == 80
    assert sum(o.finish_reason == "stop" for o in outs) >= finished * samples


COLORS = 'start: color (", " color)~0..2\ncolor: "red" | "green" | "blue"'
EXPR = 'start: expr\nexpr: DIGIT | "(" expr " + " expr ")"\nDIGIT: /[0-9]/'


@pytest.mark.parametrize("fmt, pattern", [
    ({"type": "grammar", "grammar": COLORS}, r"(red|green|blue)(, (red|green|blue)){0,2}"),
    ({"type": "regex", "regex": r"(cat|dog)-[0-9]{2}"}, r"(cat|dog)-[0-9]{2}"),
])
def test_lark_grammar_and_regex(llm, fmt, pattern):
    torch.manual_seed(4)
    for out in llm.generate(["Say:"] * 40, temperature=1.0, max_tokens=30, response_format=fmt):
        assert re.fullmatch(pattern, out.text), out.text
        assert out.finish_reason == "stop"


def test_a_recursive_lark_grammar(v3):
    torch.manual_seed(5)
    for out in v3.generate(["x"] * 40, temperature=1.0, max_tokens=400,
                           response_format={"type": "grammar", "grammar": EXPR}):
        if out.finish_reason == "stop":
            text = out.text
            while "(" in text:      # reduce innermost sums until one digit is left
                text, n = re.subn(r"\([0-9] \+ [0-9]\)", "0", text)
                assert n, out.text
            assert re.fullmatch("[0-9]", text), out.text


def test_greedy_under_a_grammar_that_allows_its_own_answer_changes_nothing(llm):
    """The mask removes only disallowed tokens: a grammar that accepts exactly the free greedy
    answer gives that answer back, token for token. (The answer as the grammar engine spells
    the tokens: SentencePiece's decode drops the space of a text's first piece, "▁Paris".)"""
    spell = llm.grammar_compiler.ll_tokenizer
    free = llm.generate("The capital of France is", max_tokens=12, ignore_eos=True)
    ids = []            # up to the first control token (a random model writes some)
    for i in free.token_ids:
        if spell.is_special_token(i):
            break
        ids.append(i)
    assert len(ids) >= 4
    literal = json.dumps(spell.decode_str(ids))
    guided = llm.generate("The capital of France is", max_tokens=12, ignore_eos=True,
                          response_format={"type": "grammar", "grammar": f"start: {literal}"})
    assert guided.token_ids == ids and guided.finish_reason == "stop"


def test_rows_of_one_batch_keep_their_own_constraints(v3):
    """A ragged batch through one scheduler: a row under a schema, a row under a regex, a
    free row; the free one equals its solo run (no mask leaks), the others validate."""
    engine = v3.engine
    tok = v3.tokenizer
    schema = v3.grammar_compiler.response_format(AS_SCHEMA)
    regex = v3.grammar_compiler.response_format({"type": "regex", "regex": "[ab]{3,6}"})
    free_solo = v3.generate([1, 5, 9, 200, 300], max_tokens=20, ignore_eos=True)
    outs: dict[int, list] = {0: [], 1: [], 2: []}
    sched = Scheduler(engine, stop_ids=tok.stop_ids, new_decoder=tok.decoder,
                      max_concurrency=3, max_queue=3, max_model_len=512, prefill_chunk=4)
    specs = [([1, 5, 9, 200, 300], SamplingParams(max_tokens=20, ignore_eos=True), None),
             ([1] + list(range(400, 430)), SamplingParams(max_tokens=80, temperature=1.0,
                                                          seed=3), schema),
             ([1, 77], SamplingParams(max_tokens=20, temperature=0.8, seed=4), regex)]
    requests = []
    for k, (prompt, params, grammar) in enumerate(specs):
        req = GenerationRequest(prompt, [params], lambda out, k=k: outs[k].append(out),
                                params.max_tokens, grammar=grammar)
        sched.submit(req)
        requests.append(req)
    while not all(r.done for r in requests):
        sched.run_once()
    text = {k: "".join(o.text for o in v) for k, v in outs.items()}
    assert [o.token_id for o in outs[0] if o.token_id is not None] == free_solo.token_ids
    jsonschema.validate(json.loads(text[1]), PERSON)
    assert re.fullmatch("[ab]{3,6}", text[2])


def test_max_tokens_cuts_a_schema_answer_with_length(v3):
    out = v3.generate("x", max_tokens=3, temperature=1.0, seed=0, response_format=AS_SCHEMA)
    assert out.finish_reason == "length" and len(out.token_ids) == 3


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}, "JSON schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "JSON schema"),
    ({"type": "regex", "regex": "[a-"}, "regex"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "grammar"),
    ({"type": "grammar", "grammar": ""}, "non-empty"),
    ({"type": "xml"}, "type must be one of"),
])
def test_an_invalid_format_is_an_input_error_naming_the_problem(v3, fmt, words):
    with pytest.raises(InputError, match=words) as info:
        v3.generate("x", max_tokens=2, response_format=fmt)
    assert info.value.param == "response_format"
    assert "\n" not in str(info.value)


def test_logit_bias_bans_and_forces(v3):
    free = v3.generate("The", max_tokens=6, ignore_eos=True)
    banned = v3.generate("The", max_tokens=6, ignore_eos=True,
                         logit_bias={free.token_ids[0]: -100})
    assert free.token_ids[0] not in banned.token_ids
    forced = v3.generate("The", max_tokens=4, ignore_eos=True, logit_bias={"1234": 100})
    assert forced.token_ids == [1234] * 4
    with pytest.raises(InputError) as info:
        v3.generate("The", max_tokens=2, logit_bias={"5": 1000})
    assert info.value.param == "logit_bias"
    with pytest.raises(InputError) as info:
        v3.generate("The", max_tokens=2, logit_bias={10**7: 1})
    assert info.value.param == "logit_bias"


def test_chat_takes_response_format(default):
    out = default.chat([{"role": "user", "content": "Give me a person as JSON."}],
                       response_format=AS_SCHEMA, max_tokens=80)
    jsonschema.validate(json.loads(out.text), PERSON)


