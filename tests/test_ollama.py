"""Ollama's API through the official `ollama` client: every answer equal to our own OpenAI route's for
the same request (same tokens, greedy), whole and streamed; think levels through the one effort table;
tools on the scripted stub; a format schema; embeddings; the model routes; errors in Ollama's shape;
fuzzed bodies never a 5xx."""

import json

import httpx
import jsonschema
import numpy as np
import ollama
import openai
import pytest
from retrieval_checkpoints import make_embedding_checkpoint
from server_live import fuzz_routes, served, stub_server

from qwen3_mlx import REASONING_EFFORTS, embed, load
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.server.ollama import protocol as p
from qwen3_mlx.server.ollama.mapping import chat_submission
from qwen3_mlx.server.submission.reading import Settings
from qwen3_mlx.server.submission.refusal import ApiError

CAP = 32
HI = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "num_predict": 12}
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def live(engine):
    with served(engine, "tiny", max_tokens=CAP, max_body_bytes=1 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return ollama.Client(host=live.url, timeout=60)


@pytest.fixture(scope="module")
def oa(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def openai_chat(oa, messages, think, **kwargs):
    return oa.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                      extra_body={"chat_template_kwargs": {"enable_thinking": think}}, **kwargs)


def assert_same(reply, expected):
    """An Ollama reply (whole, or its streamed pieces joined) against the OpenAI route's chat completion."""
    choice = expected.choices[0]
    assert reply["content"] == (choice.message.content or "")
    assert reply["thinking"] == (getattr(choice.message, "reasoning_content", None) or "")
    assert reply["eval_count"] == expected.usage.completion_tokens
    assert reply["prompt_eval_count"] == expected.usage.prompt_tokens
    assert reply["done_reason"] == {"length": "length"}.get(choice.finish_reason, "stop")


def joined(parts):
    """Streamed /api/chat objects as one reply: the pieces joined, the last object's counts."""
    last = parts[-1]
    assert last.done and all(not part.done for part in parts[:-1])
    return {"content": "".join(part.message.content or "" for part in parts),
            "thinking": "".join(part.message.thinking or "" for part in parts),
            "eval_count": last.eval_count, "prompt_eval_count": last.prompt_eval_count,
            "done_reason": last.done_reason}


def whole(reply):
    return {"content": reply.message.content, "thinking": reply.message.thinking or "", "eval_count": reply.eval_count,
            "prompt_eval_count": reply.prompt_eval_count, "done_reason": reply.done_reason}


# ---------------------------------------------------------------- the tiny checkpoint: equal to the OpenAI route


@pytest.mark.parametrize("think", [False, True])
def test_chat_equals_the_openai_route_whole_and_streamed(client, oa, think):
    expected = openai_chat(oa, HI, think)
    assert_same(whole(client.chat(model="tiny", messages=HI, think=think, options=GREEDY)), expected)
    assert_same(joined(list(client.chat(model="tiny:latest", messages=HI, think=think, options=GREEDY, stream=True))),
                expected)


def test_generate_equals_the_openai_routes(client, oa, live):
    expected = openai_chat(oa, [{"role": "system", "content": "Be brief."}, *HI], False)
    got = client.generate(model="tiny", prompt=HI[0]["content"], system="Be brief.", think=False, options=GREEDY)
    assert got.response == expected.choices[0].message.content and got.eval_count == expected.usage.completion_tokens
    raw = oa.completions.create(model="tiny", prompt="The capital of France is", temperature=0, max_tokens=8)
    parts = list(client.generate(model="tiny", prompt="The capital of France is", raw=True, stream=True,
                                 options={"temperature": 0, "num_predict": 8}))
    assert "".join(part.response for part in parts) == raw.choices[0].text
    assert parts[-1].eval_count == raw.usage.completion_tokens and parts[-1].done_reason == "length"


def test_logprobs_equal_the_openai_route(client, oa):
    expected = openai_chat(oa, HI, False, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    got = client.chat(model="tiny", messages=HI, think=False, options=GREEDY, logprobs=True, top_logprobs=2).logprobs
    assert [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in got] == \
           [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in expected]


def test_think_levels_take_the_effort_tables_budgets(client, oa):
    s = Settings("tiny", max_tokens_cap=1 << 20, default_thinking_budget=77)
    for level, budget in REASONING_EFFORTS.items():
        options = chat_submission(p.ChatRequest(model="tiny", messages=HI, think=level), s).options
        assert options.think and options.thinking_budget == budget
    assert chat_submission(p.ChatRequest(model="tiny", messages=HI, think=True), s).options.thinking_budget == 77
    assert not chat_submission(p.ChatRequest(model="tiny", messages=HI, think=False), s).options.think
    expected = openai_chat(oa, HI, True, reasoning_effort="minimal")
    assert_same(whole(client.chat(model="tiny", messages=HI, think="minimal", options=GREEDY)), expected)


def test_num_predict_is_read_as_ollama_reads_it(client):
    for value in (-1, -2):
        reply = client.chat(model="tiny", messages=HI, think=False, options={"temperature": 0, "num_predict": value})
        assert reply.eval_count <= CAP
    with pytest.raises(ollama.ResponseError, match="num_predict") as e:
        client.chat(model="tiny", messages=HI, options={"num_predict": -3})
    assert e.value.status_code == 400


def test_a_format_schema_parses_and_equals_the_openai_route(engine):
    with served(engine, "tiny", max_tokens=300) as server:
        got = ollama.Client(host=server.url, timeout=120).chat(
            model="tiny", messages=[{"role": "user", "content": "Weather as JSON"}], format=CITY, think=False,
            options={"temperature": 0})
        expected = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather as JSON"}], temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": CITY}},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    jsonschema.validate(json.loads(got.message.content), CITY)
    assert got.message.content == expected.choices[0].message.content


# ---------------------------------------------------------------- tools on the scripted stub


@pytest.fixture(scope="module")
def stub(tiny):
    with stub_server(tiny[1], CALLS, max_tokens=200) as server:
        yield ollama.Client(host=server.url, timeout=60)


def test_tool_calls_whole_and_streamed(stub):
    ask = dict(model="stub", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS)
    reply = stub.chat(**ask)
    calls = [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    assert reply.message.thinking == "I should call the tools." and reply.done_reason == "stop"
    parts = list(stub.chat(**ask, stream=True))
    streamed = [(c.function.name, dict(c.function.arguments)) for part in parts for c in part.message.tool_calls or ()]
    assert streamed == calls
    history = [*ask["messages"], reply.message, {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"}]
    assert stub.chat(model="stub", messages=history, tools=TOOLS).done


# ---------------------------------------------------------------- embeddings, the model routes


def test_embed_and_embeddings_equal_the_library(tmp_path):
    model, tokenizer = load(make_embedding_checkpoint(tmp_path, num_hidden_layers=1))
    with Engine(model, tokenizer, max_batch=2) as engine, served(engine, "emb") as server:
        client = ollama.Client(host=server.url)
        got = client.embed(model="emb", input=["hello", "world"], dimensions=32)
        assert np.abs(np.array(got.embeddings) - np.array(embed(model, tokenizer, ["hello", "world"],
                                                                dimensions=32))).max() < 1e-6
        one = client.embeddings(model="emb:latest", prompt="hello").embedding
        assert np.abs(np.array(one) - np.array(embed(model, tokenizer, ["hello"])[0])).max() < 1e-6
        assert client.show("emb").capabilities == ["embedding"]


def test_list_show_ps_version_and_the_probe(client, live, tiny):
    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.details.family == "qwen3"
    shown = client.show("tiny:latest")
    assert shown.capabilities == ["completion", "tools", "thinking"]
    assert shown.modelinfo["qwen3.context_length"] == tiny[0].args.max_position_embeddings
    (running,) = client.ps().models
    assert running.model == "tiny:latest" and running.size_vram == running.size == listed.size
    assert httpx.get(live.url + "/api/version").json()["version"]
    assert httpx.get(live.url + "/").text == "Ollama is running"
    assert "<html" in httpx.get(live.url + "/", headers={"accept": "text/html"}).text.lower()
    loaded = client.chat(model="tiny", messages=[])
    assert loaded.done and loaded.done_reason == "load"


# ---------------------------------------------------------------- refusals in Ollama's shape


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/api/chat", {"model": "nope", "messages": HI}, 404, "model 'nope' not found"),
    ("/api/chat", {"messages": HI}, 400, "model is required"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "read text only"),
    ("/api/chat", {"model": "tiny", "messages": HI, "think": "lots"}, 400, "think: give true, false or a level"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"temperature": "hot"}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"frequency_penalty": 1}}, 400, "presence_penalty"),
    ("/api/chat", {"model": "tiny", "messages": HI, "format": "yaml"}, 400, 'format: give "json"'),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "fill-in-the-middle"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2]}, 400, "/api/chat"),
    ("/api/embed", {"model": "tiny", "input": "hello"}, 400, "embedding checkpoint"),
    ("/api/pull", {"model": "qwen3"}, 400, "qwen3-mlx serve --model"),
    ("/api/create", {"model": "mario", "from": "qwen3"}, 400, "qwen3-mlx convert"),
])
def test_refusals_answer_in_ollamas_shape(live, path, body, status, words):
    response = httpx.post(live.url + path, json=body, timeout=60)
    assert response.status_code == status and list(response.json()) == ["error"]
    assert words in response.json()["error"]


def test_the_api_key_guards_ollamas_routes_and_the_metrics(engine):
    with served(engine, "tiny", api_key="sesame") as server:
        refused = httpx.get(server.url + "/api/tags")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        assert httpx.get(server.url + "/metrics").status_code == 401
        keyed = ollama.Client(host=server.url, headers={"Authorization": "Bearer sesame"})
        assert keyed.list().models[0].model == "tiny:latest"


OLLAMA_ROUTES = ['/api/chat', '/api/embed', '/api/embeddings', '/api/generate', '/api/ps', '/api/show', '/api/tags',
                 '/api/version']


def test_no_input_makes_a_server_error(live):
    """Bodies made from /openapi.json for Ollama's routes, valid and invalid: a 2xx or a 4xx each."""
    fuzz_routes(live.url, lambda path: path.startswith("/api/"), OLLAMA_ROUTES, 50)


def test_a_bad_value_is_refused_before_the_engine():
    with pytest.raises(ApiError, match="num_predict"):
        chat_submission(p.ChatRequest(model="tiny", messages=HI, options=p.Options(num_predict=-9)), Settings("tiny"))
