"""One reading of an API's body: an OpenAI batch line and the same body sent to /v1/chat/completions
give the same message, usage, budget and logprobs, and the same refusal for the same bad value."""

import json

import httpx
import pytest
from server_live import LiveServer
from stubs import ScriptedModel, replies

from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.cli.prompts_file import openai_record, read_batch_lines
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.server import ServerSettings, create_app

HI = [{"role": "user", "content": "Hello there"}]
REASONING = "Let me think about it carefully. The user asks for a sum."
ANSWER = "The answer is 4."


@pytest.fixture(scope="module")
def served(tok):
    model = ScriptedModel(replies(tok, REASONING, ANSWER), tok.encode("<|im_start|>assistant\n"))
    with Engine(model, tok, prefix_store_bytes=0) as engine, \
            LiveServer(create_app(engine, ServerSettings(("stub",), max_tokens=4096))) as server:
        yield model, server


def as_batch_line(body, i=0):
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def batch_bodies(model, tok, bodies):
    """What `generate --prompts-file` writes for the bodies, with the command line's defaults."""
    batch = read_batch_lines([as_batch_line(b, i) for i, b in enumerate(bodies)], GenerationOptions(), model="stub")
    results = batch_generate(model, tok, [r.prompt for r in batch.requests], [r.options for r in batch.requests])
    return [openai_record(r, result, tok)["response"]["body"] for r, result in zip(batch.requests, results)]


def comparable(body):
    return {"choices": body["choices"], "usage": body["usage"], "model": body["model"]}


BODIES = {
    "reasoning_effort": {"messages": HI, "reasoning_effort": "none"},
    "reasoning_effort xhigh": {"messages": HI, "reasoning_effort": "xhigh", "max_tokens": 9},
    "thinking_token_budget": {"messages": HI, "thinking_token_budget": 5},
    "thinking_budget_tokens": {"messages": HI, "thinking_budget_tokens": 6},
    "budget capped by max_tokens": {"messages": HI, "thinking_budget": 50, "max_tokens": 7},
    "completion_tokens with the end of turn": {"messages": HI, "chat_template_kwargs": {"enable_thinking": False}},
    "logprobs": {"messages": HI, "logprobs": True, "top_logprobs": 2, "max_tokens": 12},
    "nulls": {"messages": HI, "temperature": None, "stop": None, "max_tokens": None, "logit_bias": None},
}


@pytest.mark.parametrize("name", BODIES)
def test_a_batch_line_and_the_same_body_served_give_the_same_completion(served, tok, name):
    model, server = served
    body = {"model": "stub", "temperature": 0, **BODIES[name]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    [line] = batch_bodies(model, tok, [body])
    assert comparable(line) == comparable(reply.json())


BAD = {
    "logit_bias past its bounds": {"messages": HI, "logit_bias": {"5": 101}},
    "a budget below zero": {"messages": HI, "thinking_budget": -1},
    "an unknown effort": {"messages": HI, "reasoning_effort": "extreme"},
    "two budgets that disagree": {"messages": HI, "thinking_budget": 3, "thinking_token_budget": 4},
    "frequency_penalty": {"messages": HI, "frequency_penalty": 0.5},
    "top_logprobs without logprobs": {"messages": HI, "top_logprobs": 2},
}


@pytest.mark.parametrize("name", BAD)
def test_a_batch_line_is_refused_with_the_servers_message(served, name):
    _, server = served
    body = {"model": "stub", **BAD[name]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400
    with pytest.raises(Qwen3Error) as e:
        read_batch_lines([as_batch_line(body)], GenerationOptions(), "batch.jsonl", model="stub")
    assert str(e.value) == f"batch.jsonl:1: body.{reply.json()['error']['message']}"
