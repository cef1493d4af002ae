"""The OpenAI-compatible server: the real `openai` client against live servers on the tiny random
checkpoint (whose output must equal the library's) and on a scripted stub that reasons and calls
tools; refusals with OpenAI's error bodies; concurrency; disconnects; fuzzing from /openapi.json.
test_server_clients.py holds what clients nobody here wrote rely on, test_server_shutdown.py the
`serve` command itself."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import llguidance
import openai
import pydantic
import pytest
from server_live import ANSWER, REASONING, LiveServer, fuzz_routes, served, stub_server

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.generation.response import EARLY_STOP_TEXT
from qwen3_mlx.server.openai.mapping import chat_submission
from qwen3_mlx.server.openai.protocol import ChatCompletionRequest
from qwen3_mlx.server.submission.reading import Settings

CAP = 32  # the tiny server's --max-tokens
HI = [{"role": "user", "content": "Hello there"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def live(engine):
    with served(engine, "tiny", max_tokens=CAP, max_body_bytes=1 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(tiny):
    """A live server over a scripted model that reasons then answers, or calls two tools when asked about the weather."""
    with stub_server(tiny[1], CALLS, max_tokens=200) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(live, body, path="/v1/chat/completions", **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json"}, timeout=60,
                      **kwargs)


def completion_tokens(result, tok):
    """The one rule (server.openai.mapping.usage): every token of the response, the end of turn included."""
    return len(result.stats.token_ids)


# ---------------------------------------------------------------- the tiny checkpoint: equal to the library


def test_chat_equals_the_library_and_reports_usage(client, tiny):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, seed=3, extra_body=NO_THINK)
    alone = generate(*tiny, HI, GenerationOptions(think=False, max_tokens=12, max_total_tokens=12, seed=3))
    choice = reply.choices[0]
    assert choice.message.content == alone.content
    assert choice.finish_reason == {"stop": "stop", "length": "length"}[alone.stats.finish_reason]
    assert reply.usage.prompt_tokens == alone.stats.prompt_tokens
    assert reply.usage.completion_tokens == completion_tokens(alone, tiny[1])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_equals_the_whole_reply_and_ends_with_done(client, live):
    ask = {"model": "tiny", "messages": HI, "max_tokens": 10, "seed": 5, "extra_body": NO_THINK}
    whole = client.chat.completions.create(**ask)
    events = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == whole.choices[0].finish_reason
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt again: its prefix is reused across requests.
    assert events[-1].usage.prompt_tokens_details.cached_tokens > 0
    raw = post(live, {"messages": HI, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")


def test_max_tokens_is_lowered_to_the_server_cap(client):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10**6, seed=1,
                                           logit_bias={"151645": -100, "151643": -100})
    assert reply.usage.completion_tokens == CAP and reply.choices[0].finish_reason == "length"


def test_text_completion_equals_raw_generate_with_logprobs(client, tiny):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=2, logprobs=2)
    alone = generate(*tiny, "Once upon a time", GenerationOptions(think=False, max_tokens=6, max_total_tokens=6,
                                                                  seed=2, logprobs=2), raw=True)
    assert reply.choices[0].text == alone.content
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in alone.logprobs])
    assert all(len(top) <= 2 for top in reply.choices[0].logprobs.top_logprobs)


def test_chat_logprobs_name_each_token_and_its_alternatives(client, tiny):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, seed=4, logprobs=True,
                                           top_logprobs=3, extra_body=NO_THINK)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_models_health_and_unknown_names(client, live):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    memory = health["memory"]  # the engine's figures, in bytes
    assert set(memory) == {"limit", "active", "peak", "kv", "prefix_store"}
    assert 0 < memory["active"] <= memory["peak"] and memory["limit"] > memory["active"]
    missing = httpx.get(live.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_wrong_or_missing_key_is_401_and_the_right_one_passes(engine):
    with served(engine, "tiny", api_key="s3cret") as server:
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
            wrong.models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == "tiny"
        assert httpx.get(server.url + "/health").status_code == 200


def json_reason(text: bytes) -> str:
    """Python's json's reason for refusing `text` (its words, not ours)."""
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(text)
    return e.value.msg


def pydantic_reason(body: dict) -> str:
    """pydantic's reason for the first problem of a chat body (its words, not ours)."""
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    return e.value.errors()[0]["msg"]


def llguidance_reason(schema: dict) -> str:
    """llguidance's reason for refusing a JSON schema: its first line (its words, not ours)."""
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    assert error
    return error.strip().splitlines()[0]


MESSAGES = {"messages": HI}
# (body, message): our words, or (our words, a function of the body giving the third party's reason after them).
REFUSALS = [
    (b"{", ("the body is not valid JSON (", lambda body: json_reason(body))),
    (b"[]", "the body must be a JSON object"),
    ({"messages": []}, ("messages: ", pydantic_reason)),
    ({**MESSAGES, "n": 2}, "n: 2 choices asked; this server gives one per request: send 2 requests (they are batched)"),
    ({**MESSAGES, "frequency_penalty": 0.5},
     "frequency_penalty: not implemented; use presence_penalty or repetition_penalty"),
    ({**MESSAGES, "response_format": {"type": "json_schema"}},
     ('response_format: give {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
      '{"name": ..., "schema": {...}}}')),
    ({**MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     ("json_schema: ", lambda body: llguidance_reason(body["response_format"]["json_schema"]["schema"]))),
    ({**MESSAGES, "response_format": {"type": "yaml"}}, ("response_format.type: ", pydantic_reason)),
    ({**MESSAGES, "tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice: no tool is named 'get_time'; the tools are 'get_weather'"),
    ({**MESSAGES, "tools": WEATHER, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice: 'required' forces a tool call, which leaves no room for a JSON answer (response_format); use 'auto'"),
    ({**MESSAGES, "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "2"}}}]},
     "tools[0] ('f'): parameters: "),
    ({**MESSAGES, "temperature": -1}, "temperature must be >= 0, got -1.0"),
    ({**MESSAGES, "temperature": "hot"}, "temperature='hot' must be a number"),
    ({**MESSAGES, "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({**MESSAGES, "seed": -1}, "seed must be >= 0, got -1"),
    ({**MESSAGES, "logit_bias": {"x": 1}}, "logit_bias: key 'x' is not a token id (a decimal integer)"),
    ({**MESSAGES, "logit_bias": {"999999": 1}}, "logit_bias: token id 999999 is outside the vocabulary (size 151936)"),
    ({**MESSAGES, "stop": [""]}, "stop='': a stop string must be non-empty text"),
    ({**MESSAGES, "top_logprobs": 2}, "top_logprobs: needs logprobs=true"),
    ({**MESSAGES, "thinking_budget": 5, "thinking_token_budget": 6},
     "thinking_budget: thinking_budget=5, thinking_token_budget=6 disagree; give one"),
    ({**MESSAGES, "chat_template_kwargs": {"enable_thinking": "yes"}},
     "chat_template_kwargs.enable_thinking: must be true or false, got 'yes'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0] is type 'image_url'; Qwen3 reads text parts only: {\"type\": \"text\", \"text\": \"...\"}"),
    ({"messages": [{"role": "user", "content": "x " * 5000}]},
     "the model's context is 4096"),
]


@pytest.mark.parametrize(("body", "message"), REFUSALS, ids=range(len(REFUSALS)))
def test_bad_requests_are_400_with_openai_error_bodies(live, body, message):
    if isinstance(message, tuple):
        ours, reason = message
        message = ours + reason(body)
    response = post(live, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_parameters_are_ignored_and_text_completion_refusals(live):
    assert post(live, {**MESSAGES, "max_tokens": 2, "user": "me", "store": False, "metadata": {}}).status_code == 200
    assert post(live, {**MESSAGES, "max_tokens": 2, "frequency_penalty": 0}).status_code == 200
    for body, message in [({"prompt": "x", "echo": True}, "echo: echoing the prompt is not supported"),
                          ({"prompt": ["a", "b"]}, "prompt: 2 prompts: send one per request"),
                          ({"prompt": ""}, "prompt: the prompt is empty")]:
        response = post(live, body, "/v1/completions")
        assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(live):
    response = post(live, {"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert response.status_code == 413 and "over 1048576 bytes" in response.json()["error"]["message"]


# ---------------------------------------------------------------- concurrency and disconnects


def test_32_concurrent_streams_each_equal_the_request_alone(client, live):
    prompts = [[{"role": "user", "content": f"Count to {i}"}] for i in range(4)]
    ask = {"model": "tiny", "max_tokens": 8, "temperature": 0, "extra_body": NO_THINK}
    alone = [client.chat.completions.create(messages=m, **ask).choices[0].message.content for m in prompts]

    async def stream(aclient, messages):
        chunks = await aclient.chat.completions.create(messages=messages, stream=True, **ask)
        return "".join([e.choices[0].delta.content or "" async for e in chunks if e.choices])

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, prompts[i % 4]) for i in range(32)))

    assert asyncio.run(all_of_them()) == [alone[i % 4] for i in range(32)]


def test_a_client_that_disconnects_frees_its_row(tiny):
    with Engine(*tiny, max_batch=1) as engine, served(engine, "tiny", max_tokens=4000) as server:
        endless = {**MESSAGES, "stream": True, "max_tokens": 4000, "logit_bias": {"151645": -100, "151643": -100}}
        with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions",
                                                            json=endless) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines), next(lines)
            assert engine.rows == 1
        start = time.monotonic()
        while engine.rows and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert engine.rows == 0
        # The one row is free: the next request is admitted and answered at once.
        after = httpx.post(server.url + "/v1/chat/completions", json={**MESSAGES, "max_tokens": 3}, timeout=30)
        assert after.status_code == 200 and time.monotonic() - start < 10


# ---------------------------------------------------------------- reasoning and the thinking budget (scripted)


def test_reasoning_is_in_both_fields_and_never_in_content(stub):
    reply = stub.chat.completions.create(model="stub", messages=HI)
    message = reply.choices[0].message
    assert message.content == ANSWER and message.reasoning_content == message.reasoning == REASONING
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    events = list(stub.chat.completions.create(model="stub", messages=HI, stream=True))
    deltas = [e.choices[0].delta for e in events]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER


def test_enable_thinking_false_gives_no_reasoning(stub):
    message = stub.chat.completions.create(model="stub", messages=HI, extra_body=NO_THINK).choices[0].message
    assert message.content == ANSWER and getattr(message, "reasoning_content", None) is None


@pytest.mark.parametrize("name", ["thinking_budget", "thinking_budget_tokens", "thinking_token_budget"])
def test_the_thinking_budget_cuts_the_reasoning_under_each_name(stub, name):
    reply = stub.chat.completions.create(model="stub", messages=HI, extra_body={name: 4})
    message = reply.choices[0].message
    assert message.content == ANSWER
    assert "</think>" not in message.content and EARLY_STOP_TEXT.strip()[:20] not in message.content
    assert reply.usage.completion_tokens_details.reasoning_tokens <= 4 + 3


def test_reasoning_effort_none_means_no_reasoning(stub):
    reply = stub.chat.completions.create(model="stub", messages=HI, reasoning_effort="none")
    assert reply.choices[0].message.content == ANSWER
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_max_tokens_counts_the_reasoning_too(stub):
    reply = stub.chat.completions.create(model="stub", messages=HI, max_tokens=6)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == ""


# ---------------------------------------------------------------- tool calls (scripted)

WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_whole_and_streamed_as_argument_fragments(stub):
    pytest.importorskip("qwen3_mlx.text.tools")  # the library's parser
    reply = stub.chat.completions.create(model="stub", messages=WEATHER_Q, tools=WEATHER)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in choice.message.tool_calls}) == 2
    streamed: dict[int, dict] = {}
    for event in stub.chat.completions.create(model="stub", messages=WEATHER_Q, tools=WEATHER, stream=True):
        for d in (event.choices[0].delta.tool_calls or []) if event.choices else []:
            call = streamed.setdefault(d.index, {"name": "", "arguments": "", "fragments": 0})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
            call["fragments"] += 1
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(streamed.items())] == calls
    assert all(c["fragments"] > 1 for c in streamed.values())


def test_calls_that_fit_the_forced_grammar_pass_through_it_unchanged(stub):
    # Two parallel calls after reasoning, each valid against STRICT_WEATHER: "required" keeps them as they are.
    reply = stub.chat.completions.create(model="stub", messages=WEATHER_Q, tools=STRICT_WEATHER,
                                         tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == "I should call the tools."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]


def test_a_tool_result_sent_back_is_answered(stub):
    messages = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "user", "content": "Thanks, and 2+2?"}]
    reply = stub.chat.completions.create(model="stub", messages=messages, tools=WEATHER, tool_choice="none")
    assert reply.choices[0].finish_reason in ("stop", "tool_calls")


# ---------------------------------------------------------------- structured output (the tiny checkpoint)

DIGIT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "unit": {"enum": ["C", "F"]}},
         "required": ["n", "unit"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}
STRICT_WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY, "strict": True}},
                  {"type": "function", "function": {"name": "get_time", "parameters": {
                      "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"],
                      "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def roomy(engine):
    """The tiny checkpoint with room for a random model's JSON (--max-tokens 400)."""
    with served(engine, "tiny", max_tokens=400) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_response_format_json_schema_and_json_object_always_parse(roomy):
    fmt = {"type": "json_schema", "json_schema": {"name": "digit", "schema": DIGIT, "strict": True}}
    for seed in range(4):
        reply = roomy.chat.completions.create(model="tiny", messages=HI, seed=seed, response_format=fmt,
                                              extra_body=NO_THINK)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), DIGIT)
    # Any object: a random model's keys may run to the cap, so the mapping is checked, not an answer.
    body = ChatCompletionRequest(messages=HI, response_format={"type": "json_object"})
    assert chat_submission(body, Settings("tiny")).options.json_schema == {"type": "object"}


def test_with_thinking_the_reasoning_is_apart_and_the_answer_valid(roomy, tiny):
    fmt = {"type": "json_schema", "json_schema": {"name": "digit", "schema": DIGIT}}
    think = {str(tiny[1].think_start_id): 100}  # the random model opens the reasoning (the grammar allows it once)
    stream = roomy.chat.completions.create(model="tiny", messages=HI, seed=1, response_format=fmt, stream=True,
                                           logit_bias=think, extra_body={"thinking_budget": 8})
    content = reasoning = ""
    for event in stream:
        delta = event.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
    assert reasoning and EARLY_STOP_TEXT.split("</think>")[0].strip() in reasoning
    jsonschema.validate(json.loads(content), DIGIT)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_validates_against_the_tool(roomy, choice):
    # One call: after a call, a random model would rather open another than end its turn. Drawn from the
    # whole masked distribution (temperature 1, no top-p or top-k): any token the grammar allows can come,
    # and no sort of the vocabulary at every step.
    for seed in range(3):
        reply = roomy.chat.completions.create(model="tiny", messages=WEATHER_Q, tools=STRICT_WEATHER, seed=seed,
                                              tool_choice=choice, parallel_tool_calls=False, temperature=1.0,
                                              top_p=1.0, extra_body={**NO_THINK, "top_k": 0})
        choice_ = reply.choices[0]
        assert choice_.finish_reason == "tool_calls" and not choice_.message.content
        for call in choice_.message.tool_calls:
            tool = next(t["function"] for t in STRICT_WEATHER if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), tool["parameters"])
        if isinstance(choice, dict):
            assert [c.function.name for c in choice_.message.tool_calls] == ["get_weather"]


def test_a_strict_tool_in_auto_mode_is_valid_whenever_the_model_calls_it(roomy, tiny):
    # The tiny model is pushed to open a call at once; the lazy grammar then makes the call valid.
    bias = {str(tiny[1].backend.token_to_id("<tool_call>")): 100}
    tools = STRICT_WEATHER[:1]
    reply = roomy.chat.completions.create(model="tiny", messages=WEATHER_Q, tools=tools, seed=0, logit_bias=bias,
                                          parallel_tool_calls=False, extra_body=NO_THINK)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)


# ---------------------------------------------------------------- fuzzing from the schema


def test_no_input_makes_a_server_error(engine):
    """Bodies made from /openapi.json, valid and invalid: every answer is a 2xx or a 4xx. The Messages and
    Responses routes are left to test_anthropic.py and test_responses.py (60 bodies each), Ollama's to
    test_ollama.py; the other ten get 60 here. The server caps answers at 8 tokens
    (as test_responses.py's fuzzing does): valid bodies take the same paths in a quarter of the time."""
    with served(engine, "tiny", max_tokens=8, max_body_bytes=1 << 20) as live:
        fuzz_the_schema(live)


ROUTES = ['/health', '/rerank', '/score', '/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/v1/models',
          '/v1/models/{model}', '/v1/rerank', '/v2/rerank']


def fuzz_the_schema(live: LiveServer) -> None:
    fuzz_routes(live.url, lambda path: not path.startswith(("/v1/messages", "/v1/responses", "/api/")), ROUTES, 60)


# ---------------------------------------------------------------- the command line


def test_generate_does_not_import_the_server():
    code = "import sys, qwen3_mlx.cli.commands; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
