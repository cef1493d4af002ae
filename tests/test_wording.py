"""One wording per bad value in every path: the same bad values sent through the Python API, a
`--prompts-file` chat line and each HTTP API (OpenAI's chat completions, Anthropic's Messages, OpenAI's
Responses) are refused with the same message, GenerationOptions', inside each API's own error shape and
naming the parameter. A bound of one wire API alone is that API's mapping's, told in the same style."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from server_live import served

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.cli.prompts_file import read_batch_lines
from qwen3_mlx.errors import OptionError, Qwen3Error

HI = [{"role": "user", "content": "hi"}]
BODIES = {  # each API's path and a body it would answer, which a row then spoils
    "openai": ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": HI}),
    "anthropic": ("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": HI}),
    "responses": ("/v1/responses", {"model": "tiny", "max_output_tokens": 2, "input": "hi"}),
}
NO_SUCH_FIELD = None  # the API has no field for this value: the cell is left out

# (the library's options (the Python API's keywords, a chat line's keys), the message,
#  {API: (the body's fields, the parameter its error names) or NO_SUCH_FIELD})
TABLE = [
    ({"temp": -1}, "temperature must be >= 0, got -1.0",
     {"openai": ({"temperature": -1}, "temperature"), "anthropic": ({"temperature": -1}, "temperature"),
      "responses": ({"temperature": -1}, "temperature")}),
    # inf is no JSON, but Python's json writes and reads it as Infinity (so does a chat line)
    ({"temp": math.inf}, "temperature must be finite, got inf",
     {"openai": ({"temperature": math.inf}, "temperature"), "anthropic": ({"temperature": math.inf}, "temperature"),
      "responses": ({"temperature": math.inf}, "temperature")}),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0.0",
     {"openai": ({"top_p": 0}, "top_p"), "anthropic": ({"top_p": 0}, "top_p"), "responses": ({"top_p": 0}, "top_p")}),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5",
     {"openai": ({"top_p": 1.5}, "top_p"), "anthropic": ({"top_p": 1.5}, "top_p"),
      "responses": ({"top_p": 1.5}, "top_p")}),
    ({"top_k": -3}, "top_k must be >= 0 (0 = off), got -3",
     {"openai": ({"top_k": -3}, "top_k"), "anthropic": ({"top_k": -3}, "top_k"), "responses": ({"top_k": -3}, "top_k")}),
    ({"min_p": 2}, "min_p must be in [0, 1], got 2.0",
     {"openai": ({"min_p": 2}, "min_p"), "anthropic": NO_SUCH_FIELD, "responses": NO_SUCH_FIELD}),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0 and finite, got 0.0",
     {"openai": ({"repetition_penalty": 0}, "repetition_penalty"), "anthropic": NO_SUCH_FIELD,
      "responses": NO_SUCH_FIELD}),
    ({"seed": -1}, "seed must be >= 0, got -1",
     {"openai": ({"seed": -1}, "seed"), "anthropic": ({"seed": -1}, "seed"), "responses": ({"seed": -1}, "seed")}),
    ({"seed": 2**64}, f"seed must be below 2**64, got {2**64}",
     {"openai": ({"seed": 2**64}, "seed"), "anthropic": ({"seed": 2**64}, "seed"),
      "responses": ({"seed": 2**64}, "seed")}),
    ({"thinking_budget": -1}, "thinking_budget must be >= 0, got -1",
     {"openai": ({"thinking_budget": -1}, "thinking_budget"),
      "anthropic": ({"thinking": {"type": "enabled", "budget_tokens": -1}}, "thinking.budget_tokens"),
      "responses": ({"thinking_budget": -1}, "thinking_budget")}),
    ({"stop": [""]}, "stop='': a stop string must be non-empty text",
     {"openai": ({"stop": [""]}, "stop"), "anthropic": ({"stop_sequences": [""]}, "stop_sequences"),
      "responses": NO_SUCH_FIELD}),
    ({"max_tokens": "many"}, "max_tokens='many' must be an integer",
     {"openai": ({"max_tokens": "many"}, "max_tokens"), "anthropic": ({"max_tokens": "many"}, "max_tokens"),
      # the Responses API calls it max_output_tokens: the same words, about its own name
      "responses": ({"max_output_tokens": "many"}, "max_output_tokens", "max_output_tokens='many' must be an integer")}),
]
APIS = tuple(BODIES)


def test_every_row_fills_or_leaves_out_each_api_explicitly():
    assert len(TABLE) >= 10
    assert all(set(cells) == set(APIS) for _, _, cells in TABLE)


@pytest.fixture(scope="module")
def live(engine):
    with served(engine, "tiny", max_tokens=8) as server:
        yield server


@pytest.mark.parametrize(("options", "message"), [row[:2] for row in TABLE], ids=[row[1] for row in TABLE])
def test_the_python_api_refuses_in_the_words(tiny, options, message):
    with pytest.raises(OptionError) as e:
        generate(*tiny, "hi", **options)
    assert str(e.value) == message
    with pytest.raises(OptionError) as e:
        GenerationOptions(**options)
    assert str(e.value) == message


@pytest.mark.parametrize(("options", "message"), [row[:2] for row in TABLE], ids=[row[1] for row in TABLE])
def test_a_prompts_file_line_refuses_in_the_words(options, message):
    lines = [json.dumps({"messages": HI}), json.dumps({"messages": HI, **options})]
    with pytest.raises(Qwen3Error) as e:
        read_batch_lines(lines, GenerationOptions(), "prompts.jsonl")
    assert str(e.value) == f"prompts.jsonl:2: {message}"


CELLS = [(api, message, cell) for _, message, cells in TABLE for api, cell in cells.items() if cell is not NO_SUCH_FIELD]


def post(live, api: str, fields: dict) -> httpx.Response:
    path, body = BODIES[api]
    # json.dumps, not httpx's json=: it writes inf as Infinity, which the server's JSON reader takes
    return httpx.post(live.url + path, content=json.dumps({**body, **fields}),
                      headers={"content-type": "application/json"}, timeout=60)


def refusal(api: str, message: str, param: str) -> dict:
    """The 400's body in the API's own shape."""
    if api == "anthropic":  # Anthropic's shape names no parameter: the message does
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


@pytest.mark.parametrize(("api", "message", "cell"), CELLS, ids=[f"{api}: {message}" for api, message, _ in CELLS])
def test_each_http_api_refuses_in_the_words_in_its_own_shape(live, api, message, cell):
    fields, param, *own = cell
    message = own[0] if own else message
    response = post(live, api, fields)
    assert response.status_code == 400, response.text
    assert response.json() == refusal(api, message, param)


# ---------------------------------------------------------------- one wire API's own bounds


@pytest.mark.parametrize(("api", "fields", "message", "param"), [
    ("openai", {"presence_penalty": 3}, "presence_penalty must be in [-2, 2], got 3.0", "presence_penalty"),
    ("openai", {"logit_bias": {"7": 150}}, "logit_bias: the bias of token 7 must be in [-100, 100], got 150.0",
     "logit_bias"),
    ("openai", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20], got 21", "top_logprobs"),
    ("openai", {"max_tokens": 0}, "max_tokens must be >= 1, got 0", "max_tokens"),
    ("anthropic", {"max_tokens": 0}, "max_tokens must be >= 1, got 0", "max_tokens"),
    ("responses", {"max_output_tokens": 0}, "max_output_tokens must be >= 1, got 0", "max_output_tokens"),
    # a value both refuse is told in GenerationOptions' words
    ("openai", {"presence_penalty": math.inf}, "presence_penalty must be finite, got inf", "presence_penalty"),
    ("openai", {"logit_bias": {"7": math.inf}}, "logit_bias: bias for token 7 must be finite or -inf, got inf",
     "logit_bias"),
])
def test_a_bound_of_one_wire_api_is_its_mappings_in_the_same_style(live, api, fields, message, param):
    response = post(live, api, fields)
    assert response.status_code == 400, response.text
    assert response.json() == refusal(api, message, param)
