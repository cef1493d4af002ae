"""Structured output through generate and batch_generate on a random-weight model, whose free text is
gibberish: every answer still ends with the end of turn and validates."""

import json
import re

import jsonschema
import pytest
from test_structured import SCHEMAS

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.options import EngineOptions
from qwen3_mlx.errors import OptionError
from qwen3_mlx.generation.response import EARLY_STOP_TEXT


@pytest.mark.parametrize("name", SCHEMAS)
def test_twenty_sampled_answers_per_schema_end_and_validate(tiny, name):
    model, tok = tiny
    schema = SCHEMAS[name]
    # Drawn from the whole masked distribution (no top-k or top-p): any token the grammar allows can come,
    # and no sort over the vocabulary per row and step (top-p's), which made this test a third slower.
    options = [GenerationOptions(json_schema=schema, think=False, seed=i, max_tokens=400, temp=1.0, top_k=0,
                                 top_p=1.0) for i in range(20)]
    results = batch_generate(model, tok, ["Answer in JSON."] * 20, options,
                             engine_options=EngineOptions(max_batch=20))
    for r in results:
        assert r.stats.finish_reason == "stop" and not r.incomplete
        jsonschema.validate(json.loads(r.content), schema)
    assert len({r.content for r in results}) > 1  # the seeds drew different answers


def test_rows_with_different_constraints_in_one_batch_each_match_their_own(tiny):
    model, tok = tiny
    names = list(SCHEMAS)[:3]
    options = [GenerationOptions(json_schema=SCHEMAS[n], think=False, seed=7, max_tokens=400) for n in names]
    options += [GenerationOptions(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}", think=False, seed=7, max_tokens=20),
                GenerationOptions(think=False, seed=7, max_tokens=12)]  # unconstrained
    prompts = ["JSON please."] * len(options)
    batched = batch_generate(model, tok, prompts, options)
    for n, r in zip(names, batched):
        jsonschema.validate(json.loads(r.content), SCHEMAS[n])
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", batched[3].content)
    # Each row is the request alone.
    assert [r.token_ids for r in batched] == [generate(model, tok, p, o).token_ids for p, o in zip(prompts, options)]


def test_with_thinking_and_a_budget_the_reasoning_is_free_and_the_answer_valid(tiny):
    model, tok = tiny
    schema = SCHEMAS[next(iter(SCHEMAS))]
    r = generate(model, tok, "Think, then answer in JSON.", json_schema=schema, thinking_budget=6, seed=3,
                 max_tokens=400, prefill_response="<think>\n")
    assert r.stats.budget_exhausted and r.stats.reasoning_tokens >= 6
    assert r.reasoning.endswith(EARLY_STOP_TEXT.split("</think>")[0].rstrip("\n"))
    jsonschema.validate(json.loads(r.content), schema)
    assert r.stats.finish_reason == "stop"


def test_a_small_lark_grammar_and_a_regex(tiny):
    model, tok = tiny
    lark = 'start: "The answer is " ("yes" | "no") "."'
    r = generate(model, tok, "Yes or no?", grammar=lark, think=False, seed=1, max_tokens=30)
    assert r.content in ("The answer is yes.", "The answer is no.") and r.stats.finish_reason == "stop"
    r = generate(model, tok, "A date?", regex=r"20[0-9]{2}-(0[1-9]|1[0-2])", think=False, seed=2, max_tokens=30)
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", r.content)


def test_an_answer_cut_by_max_tokens_says_it_is_incomplete(tiny):
    model, tok = tiny
    r = generate(model, tok, "JSON", json_schema={"type": "array", "items": {"type": "integer"}, "minItems": 50},
                 think=False, seed=0, max_tokens=5)
    assert (r.stats.finish_reason, r.incomplete) == ("length", True)


def test_a_bad_schema_is_refused_before_generation_in_one_line(tiny):
    model, tok = tiny
    with pytest.raises(OptionError) as e:
        generate(model, tok, "q", json_schema={"type": "foo"})
    assert str(e.value) == "json_schema: Invalid type: foo"
    with pytest.raises(OptionError) as e:
        GenerationOptions(json_schema={"type": "object"}, regex="a")
    assert str(e.value) == "structured output: give one of json_schema, regex or grammar, got json_schema and regex"
