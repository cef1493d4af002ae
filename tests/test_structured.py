"""Structured output: answers sampled through the grammar mask match the schema, regex or grammar; the
reasoning block, the forced early-stop text and the end of turn; bad specs are refused in one line."""

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
import tokenizers
from checkpoints import QWEN_VOCAB, tokenizer_dir

from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.text.structured import (
    GrammarState,
    GrammarVocabulary,
    compile_constraint,
)
from qwen3_mlx.text.tool_grammar import tool_call_grammar

IM_END, END_OF_TEXT, THINK, END_THINK = 151645, 151643, 151667, 151668  # <|im_end|> <|endoftext|> <think> </think>
EARLY_STOP = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
              "directly now.\n</think>\n\n")
BANK = 16  # rows of random logits the sampler cycles through: drawing 151936 normals per step costs ~5 ms


@pytest.fixture(scope="module")
def backend() -> tokenizers.Tokenizer:
    """The real Qwen3 tokenizer.json, parsed (what the tiny checkpoint holds too)."""
    return tokenizers.Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def vocabulary(tok, backend) -> GrammarVocabulary:
    return GrammarVocabulary(backend, QWEN_VOCAB, tok.eos_token_ids)


@pytest.fixture(scope="module")
def logit_bank() -> mx.array:
    return mx.random.normal((BANK, QWEN_VOCAB), key=mx.random.key(1234))


def sample(state: GrammarState, bank: mx.array, seed: int, cap: int = 400) -> list[int]:
    """Ids drawn from masked random logits until an end-of-turn id or `cap`."""
    key, ids = mx.random.key(seed), []
    for step in range(cap):
        key, sub = mx.random.split(key)
        token = mx.random.categorical(state.mask(bank[(seed + step) % BANK]), key=sub).item()
        state.advance(token)
        ids.append(token)
        if token in (IM_END, END_OF_TEXT):
            break
    return ids


def allowed(state: GrammarState) -> set[int]:
    """The ids the mask lets through."""
    masked = np.array(state.mask(mx.zeros((QWEN_VOCAB,))))
    return set(np.flatnonzero(masked == 0).tolist())


def answer(tok, state: GrammarState, bank: mx.array, seed: int) -> str:
    """A sampled answer, asserted to end with an end-of-turn id, as text without it."""
    ids = sample(state, bank, seed)
    assert ids[-1] in (IM_END, END_OF_TEXT)
    assert state.done
    return tok.decode(ids[:-1])


# ---------------------------------------------------------------- JSON schemas


SCHEMAS = {
    "flat_required_and_optional": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 12},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}},
    "nested_object_with_enum_array": {
        "type": "object", "additionalProperties": False, "required": ["user", "active"],
        "properties": {
            "user": {"type": "object", "additionalProperties": False, "required": ["id", "roles"],
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                    "roles": {"type": "array", "minItems": 1, "maxItems": 3,
                                              "items": {"enum": ["admin", "user", "guest"]}}}},
            "active": {"type": "boolean"}}},
    "array_of_points": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                  "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10},
                                 "y": {"type": "integer", "minimum": -5, "maximum": 5}}}},
    "top_level_enum": {"enum": ["red", "green", "blue"]},
    "bounded_numbers": {
        "type": "object", "additionalProperties": False, "required": ["price", "qty"],
        "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 5}}},
    "const_and_nullable_date": {
        "type": "object", "additionalProperties": False, "required": ["kind", "when"],
        "properties": {"kind": {"const": "event"},
                       "when": {"anyOf": [{"type": "null"},
                                          {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}]}}},
    "tuple_by_prefix_items": {
        "type": "array", "prefixItems": [{"type": "string", "maxLength": 5},
                                         {"type": "integer", "minimum": 0, "maximum": 99}], "items": False,
        "minItems": 2},
    "patterned_strings": {
        "type": "object", "additionalProperties": False, "required": ["code"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                       "note": {"type": "string", "maxLength": 20}}},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_answers_end_with_eos_and_validate(tok, vocabulary, logit_bank, name):
    schema = SCHEMAS[name]
    grammar = compile_constraint(vocabulary, json_schema=schema, thinking=False)
    for seed in range(3):
        jsonschema.validate(json.loads(answer(tok, grammar.state(), logit_bank, seed)), schema)


def test_pydantic_model_class_is_its_schema(tok, vocabulary, logit_bank):
    pydantic = pytest.importorskip("pydantic")  # not a dependency: callers who pass a model class have it

    class Reading(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        sensor: str = pydantic.Field(max_length=8)
        celsius: float = pydantic.Field(ge=-40, le=60)
        ok: bool

    grammar = compile_constraint(vocabulary, json_schema=Reading, thinking=False)
    for seed in range(3):
        Reading.model_validate_json(answer(tok, grammar.state(), logit_bank, seed))


NESTED = {"type": "object", "properties": {"a": {"type": "object", "properties": {
    "b": {"type": "array", "items": {"type": "integer"}}}}}}
VALUE = {"a": {"b": [1, 2]}}
DEEP = {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#"}}]}  # arrays nested at will


def accepts(backend, state: GrammarState, text: str) -> bool:
    """The state takes the text's tokens and may end there."""
    try:
        for token in backend.encode(text, add_special_tokens=False).ids:
            state.advance(token)
    except Qwen3Error:
        return False
    return state.accepting


@pytest.mark.parametrize(("text", "expected"), [
    (json.dumps(VALUE, separators=(",", ":")), True),  # no whitespace
    (json.dumps(VALUE), True),  # one space after , and :
    (json.dumps(VALUE, indent=2), True),  # a newline, then two spaces a level
    (json.dumps(VALUE, indent=4), True),  # four a level: two levels of two
    (json.dumps(VALUE).replace(": ", ":  ", 1), False),  # two spaces
    (json.dumps(VALUE, indent=2).replace("\n", "\n\n", 1), False),  # a blank line
    (json.dumps(VALUE, indent=2).replace("\n", "\r\n"), False),
    (json.dumps(VALUE, indent="\t"), False),
    (json.dumps(VALUE, indent=3), False),  # an odd indentation
    (json.dumps(VALUE, indent=2).replace("\n", " \n", 1), False),  # a space, then a newline
])
def test_json_whitespace_is_what_formatting_needs(backend, vocabulary, text, expected):
    state = compile_constraint(vocabulary, json_schema=NESTED, thinking=False).state()
    assert accepts(backend, state, text) is expected


@pytest.mark.parametrize(("levels", "expected"), [(10, True), (11, False)])
def test_json_indentation_goes_ten_levels_deep(backend, vocabulary, levels, expected):
    value = 1
    for _ in range(levels):  # the 1 inside `levels` arrays: indented by 2 x levels spaces
        value = [value]
    state = compile_constraint(vocabulary, json_schema=DEEP, thinking=False).state()
    assert accepts(backend, state, json.dumps(value, indent=2)) is expected

# ---------------------------------------------------------------- regex and grammars


def test_regex_first_mask_is_exactly_the_prefix_tokens_and_eos_only_at_the_end(tok, vocabulary):
    state = compile_constraint(vocabulary, regex="yes|no", thinking=False).state()
    assert allowed(state) == {77, 88, 2152, 9011, 9693}  # n, y, no, ye, yes
    assert not state.accepting
    state.advance(9693)  # yes
    assert state.accepting and state.done
    assert allowed(state) == {END_OF_TEXT, IM_END}


def test_sampled_regex_answers_match(tok, vocabulary, logit_bank):
    pattern = r"[0-9]{3}-[0-9]{4}( ext [0-9]{1,3})?"
    grammar = compile_constraint(vocabulary, regex=pattern, thinking=False)
    for seed in range(3):
        assert re.fullmatch(pattern, answer(tok, grammar.state(), logit_bank, seed))


def test_sampled_lark_answers_match(tok, vocabulary, logit_bank):
    lark = 'start: greeting " " NAME "!"\ngreeting: "hello" | "hi"\nNAME: /[A-Z][a-z]{1,8}/\n'
    grammar = compile_constraint(vocabulary, grammar=lark, thinking=False)
    for seed in range(3):
        assert re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,8}!", answer(tok, grammar.state(), logit_bank, seed))


def test_sampled_gbnf_answers_match(tok, vocabulary, logit_bank):
    gbnf = 'root ::= "(" item ("," item){0,2} ")"\nitem ::= [a-c]{1,4}\n'
    grammar = compile_constraint(vocabulary, grammar=gbnf, thinking=False)
    for seed in range(3):
        assert re.fullmatch(r"\([a-c]{1,4}(,[a-c]{1,4}){0,2}\)", answer(tok, grammar.state(), logit_bank, seed))


# ---------------------------------------------------------------- the reasoning block


def test_thinking_allows_think_or_the_answer_first_and_false_only_the_answer(vocabulary):
    with_block = compile_constraint(vocabulary, regex="yes|no", thinking=True).state()
    assert allowed(with_block) == {77, 88, 2152, 9011, 9693, THINK}
    without = compile_constraint(vocabulary, regex="yes|no", thinking=False).state()
    assert THINK not in allowed(without)


def test_reasoning_block_takes_free_text_but_no_end_of_turn(tok, vocabulary, logit_bank):
    schema = SCHEMAS["bounded_numbers"]
    state = compile_constraint(vocabulary, json_schema=schema, thinking=True).state()
    for token in tok.encode("<think>\nThe user wants {\"price\": 3} or <b>so</b>; 价格?"):
        state.advance(token)
    inside = allowed(state)
    assert END_THINK in inside and IM_END not in inside and END_OF_TEXT not in inside and THINK not in inside
    assert max(inside) == END_THINK  # ids past the tokenizer's (151669..151935) are never allowed
    for token in tok.encode("\n</think>\n\n"):
        state.advance(token)
    jsonschema.validate(json.loads(answer(tok, state, logit_bank, 7)), schema)


def test_forced_early_stop_text_is_accepted_mid_reasoning(tok, vocabulary, logit_bank):
    schema = SCHEMAS["nested_object_with_enum_array"]
    grammar = compile_constraint(vocabulary, json_schema=schema, thinking=True)
    for seed in range(2):
        state = grammar.state()
        state.advance(THINK)
        # Free reasoning sampled through the mask, cut by the budget (the tokens the loop feeds).
        key = mx.random.key(seed)
        for step in range(20):
            key, sub = mx.random.split(key)
            state.advance(mx.random.categorical(state.mask(logit_bank[step % BANK]), key=sub).item())
        for token in tok.encode(EARLY_STOP):
            state.advance(token)
        jsonschema.validate(json.loads(answer(tok, state, logit_bank, seed)), schema)


def test_sampled_answer_with_thinking_may_skip_the_block(tok, vocabulary, logit_bank):
    grammar = compile_constraint(vocabulary, grammar='start: "A" | "B"', thinking=True)
    state = grammar.state()
    state.advance(tok.encode("B")[0])
    assert state.done and allowed(state) == {END_OF_TEXT, IM_END}


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("spec", "message"), [
    ({"json_schema": {"type": "foo"}}, "json_schema: Invalid type: foo"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 2}},
     "json_schema: Unsatisfiable schema: minimum (5) is greater than maximum (2)"),
    ({"json_schema": {"$ref": "#/$defs/x"}}, "json_schema: Pointer '/$defs/x' does not exist"),
    ({"json_schema": {"type": "string", "format": "colour"}}, "json_schema: Unknown format: colour"),
    ({"json_schema": ["type", "object"]},
     "json_schema: expected a JSON schema object or a pydantic model class, got list"),
    ({"json_schema": int}, ("json_schema: int is not a pydantic BaseModel subclass; give a schema object or a "
                            "pydantic model class")),
    ({"regex": "[a-z"}, 'regex: invalid regex "[a-z" (in regex): regex parse error: unclosed character class'),
    ({"regex": "(a"}, 'regex: invalid regex "(a" (in regex): regex parse error: unclosed group'),
    ({"grammar": "start: foo"}, 'grammar: at 1(8): unknown name: "foo"'),
    ({"grammar": "root ::= foo"}, "grammar: GBNF: Rule 'foo' not found"),
    ({}, "structured output: give exactly one of json_schema, regex or grammar, got none"),
    ({"regex": "a", "grammar": 'start: "a"'},
     "structured output: give exactly one of json_schema, regex or grammar, got regex and grammar"),
])
@pytest.mark.parametrize("thinking", [False, True])
def test_bad_spec_is_one_line_option_error(vocabulary, spec, message, thinking):
    with pytest.raises(OptionError) as e:
        compile_constraint(vocabulary, thinking=thinking, **spec)
    assert str(e.value) == message


def test_token_outside_the_grammar_is_refused(vocabulary):
    state = compile_constraint(vocabulary, regex="yes|no", thinking=False).state()
    with pytest.raises(Qwen3Error) as e:
        state.advance(IM_END)
    assert str(e.value) == ("structured output: token 151645 ⟦<|im_end|>⟧ is not allowed by the grammar here: "
                            "Parser Error: token \"�[151645]\" doesn't satisfy the grammar; byte 'ÿ' fails parse")


def test_mask_keeps_shape_and_dtype_and_refuses_another_width(vocabulary):
    state = compile_constraint(vocabulary, regex="a", thinking=False).state()
    masked = state.mask(mx.zeros((1, QWEN_VOCAB), dtype=mx.bfloat16))
    assert masked.shape == (1, QWEN_VOCAB) and masked.dtype == mx.bfloat16
    with pytest.raises(ValueError) as e:
        state.mask(mx.zeros((512,)))
    assert str(e.value) == "logits have 512 entries but the grammar was compiled for a vocabulary of 151936"


def test_vocab_size_below_the_tokenizer_is_refused(tok, backend):
    with pytest.raises(Qwen3Error) as e:
        GrammarVocabulary(backend, 512, tok.eos_token_ids)
    assert str(e.value) == ("vocab_size=512 is below the tokenizer's 151669 ids; the checkpoint's config.json and "
                            "tokenizer.json do not belong together")


# ---------------------------------------------------------------- a model's logits


def test_tiny_model_greedy_answer_through_the_mask_validates(tiny, backend):
    model, tokenizer = tiny
    schema = SCHEMAS["flat_required_and_optional"]
    vocab = GrammarVocabulary(backend, model.args.vocab_size, tokenizer.eos_token_ids)
    state = compile_constraint(vocab, json_schema=schema, thinking=False).state()
    cache, step = model.make_cache(), tokenizer.encode("<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n")
    ids = []
    for _ in range(120):
        logits = model.decode(mx.array([step]), cache)  # (1, V)
        token = mx.argmax(state.mask(logits), axis=-1).item()
        state.advance(token)
        ids.append(token)
        step = [token]
        if token in tokenizer.eos_token_ids:
            break
    assert ids[-1] in tokenizer.eos_token_ids
    jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), schema)


# ---------------------------------------------------------------- tool-call grammars

TOOL_CALL, END_TOOL_CALL = 151657, 151658  # <tool_call> </tool_call>
GET = {"type": "function", "function": {"name": "get", "strict": True, "parameters": {
    "type": "object", "properties": {"x": {"$ref": "#/$defs/Small"}}, "required": ["x"],
    "additionalProperties": False, "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
PUT = {"type": "function", "function": {"name": "put", "parameters": {
    "type": "object", "properties": {"y": {"type": "string"}}, "required": ["y"]}}}


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def takes(backend, vocabulary, grammar: str, text: str, thinking: bool = False) -> bool:
    """The grammar takes the text's tokens and may end there."""
    state = compile_constraint(vocabulary, grammar=grammar, thinking=thinking).state()
    try:
        for token in backend.encode(text, add_special_tokens=False).ids:
            state.advance(token)
    except Qwen3Error:
        return False
    return state.accepting


@pytest.mark.parametrize("choice, parallel, text, expected", [
    ("required", True, call_text("get", {"x": 5}), True),
    ("required", True, call_text("get", {"x": 10}), False),  # the $ref'd maximum
    ("required", True, call_text("put", {"y": "a"}) + "\n" + call_text("get", {"x": 1}), True),
    ("required", False, call_text("put", {"y": "a"}) + "\n" + call_text("get", {"x": 1}), False),
    ("required", True, call_text("put", {"z": 1}), False),  # required is strict for every tool
    ("required", True, call_text("other", {}), False),
    ("required", True, "Sure: " + call_text("get", {"x": 5}), False),
    ("get", True, call_text("get", {"x": 5}), True),
    ("get", True, call_text("put", {"y": "a"}), False),
    ("get", True, call_text("get", {"x": 5}) + "\n" + call_text("get", {"x": 5}), False),  # a name: one call
    ("auto", True, "No call needed.", True),
    ("auto", True, "Let me look.\n\n" + call_text("get", {"x": 5}), True),
    ("auto", True, "Let me look.\n\n" + call_text("get", {"x": "five"}), False),  # get is strict
    ("auto", True, call_text("put", {"z": 1}), True),  # put is not: any object
    ("auto", False, call_text("put", {"y": "a"}) + "\n" + call_text("get", {"x": 1}), False),
])
def test_tool_call_grammar_takes_exactly_the_valid_calls(backend, vocabulary, choice, parallel, text, expected):
    grammar = tool_call_grammar([GET, PUT], choice=choice, parallel=parallel)
    assert takes(backend, vocabulary, grammar, text) is expected


def test_free_text_cannot_spell_a_call_tag_with_ordinary_tokens(backend, vocabulary):
    grammar = tool_call_grammar([GET], choice="auto")
    state = compile_constraint(vocabulary, grammar=grammar, thinking=False).state()
    assert TOOL_CALL in allowed(state)  # the real token opens a call
    for token in [backend.token_to_id(p) for p in ("<", "tool", "_call")]:
        state.advance(token)
    assert backend.token_to_id(">") not in allowed(state) and backend.token_to_id(">Ċ") not in allowed(state)
    assert backend.token_to_id(">,") not in allowed(state) and backend.token_to_id("s") in allowed(state)


def test_with_a_schema_auto_answers_json_or_calls(backend, vocabulary):
    grammar = tool_call_grammar([GET], choice="auto", answer_schema={"type": "object", "required": ["a"],
                                                                     "properties": {"a": {"type": "integer"}}})
    assert takes(backend, vocabulary, grammar, '{"a": 3}')
    assert takes(backend, vocabulary, grammar, call_text("get", {"x": 3}))
    assert not takes(backend, vocabulary, grammar, "Hello")


def test_reasoning_comes_before_forced_calls(backend, vocabulary):
    grammar = tool_call_grammar([GET], choice="required")
    assert takes(backend, vocabulary, grammar, "<think>\nwhich tool?\n</think>\n\n" + call_text("get", {"x": 2}),
                 thinking=True)
    assert TOOL_CALL in allowed(compile_constraint(vocabulary, grammar=grammar, thinking=False).state())


@pytest.mark.parametrize("kwargs, message", [
    ({"tools": []}, "tools: a tool-call grammar needs at least one tool, and none were given"),
    ({"tools": [GET], "choice": "put"}, "tool_choice: no tool is named 'put'; the tools are 'get'"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     ('tools[0]: a tool is {"type": "function", "function": {"name": ..., "parameters": {...}}}, and this one '
      "has no name")),
    ({"tools": [GET, {"function": {"name": "bad", "parameters": {"type": "foo"}}}]},
     "tools[1] ('bad'): parameters: Invalid type: foo"),
    ({"tools": [GET], "answer_schema": {"type": "object"}},
     ("tool_choice: 'required' forces a tool call, which leaves no room for a JSON answer (response_format); "
      "use 'auto'")),
    ({"tools": [GET], "choice": "auto", "answer_schema": {"type": "foo"}}, "response_format: Invalid type: foo"),
])
def test_bad_tools_are_one_line_option_errors(kwargs, message):
    with pytest.raises(OptionError) as e:
        tool_call_grammar(**kwargs)
    assert str(e.value) == message
