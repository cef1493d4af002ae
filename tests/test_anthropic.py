"""Anthropic's Messages API: the real `anthropic` SDK against live servers on the tiny random checkpoint
(whose text must equal the library's) and on a scripted stub that reasons and calls tools; count_tokens;
errors in Anthropic's shape; what Claude Code sends; fuzzing of both routes from /openapi.json."""

import asyncio
import json

import anthropic
import httpx
import jsonschema
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_live import ANSWER, HEADER, REASONING, fuzz_routes, served, stub_server
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.text.prompt import encode_prompt
from qwen3_mlx.generation.response import EARLY_STOP_TEXT
from qwen3_mlx.server.anthropic.events import with_pings
from qwen3_mlx.server.anthropic.mapping import messages_submission
from qwen3_mlx.server.anthropic.protocol import MessagesRequest
from qwen3_mlx.server.submission.reading import Settings

CAP = 32
HI = [{"role": "user", "content": "Hello there"}]
OFF = {"type": "disabled"}
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": CITY},
         {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
                                               "required": ["zone"], "additionalProperties": False}}]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(engine):
    with served(engine, "tiny", max_tokens=CAP, max_body_bytes=1 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def roomy(engine):
    """The tiny checkpoint with room for a random model's JSON."""
    with served(engine, "tiny", max_tokens=400) as server:
        yield anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(tiny):
    """A scripted model that reasons then answers, or calls two tools when asked about the weather."""
    with stub_server(tiny[1], CALLS, max_tokens=200) as s:
        yield anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0, timeout=60)


def post(url, body, path="/v1/messages", **kwargs):
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json", **kwargs.pop("headers", {})}, **kwargs)


# ---------------------------------------------------------------- the tiny checkpoint: equal to the library


def test_text_equals_the_library_whole_and_streamed(client, tiny):
    ask = dict(model="tiny", max_tokens=12, messages=HI, thinking=OFF, extra_body={"temperature": 0})
    message = client.messages.create(**ask)
    alone = generate(*tiny, HI, GenerationOptions(think=False, max_tokens=12, max_total_tokens=12, temp=0))
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == alone.content
    assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[alone.stats.finish_reason]
    assert message.usage.output_tokens == len(alone.stats.token_ids)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == alone.stats.prompt_tokens
    with client.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == alone.content
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.cache_read_input_tokens > 0  # the same prompt again: its prefix is reused


def test_count_tokens_equals_the_prompts_token_count(client, tiny):
    system = "You are terse."
    counted = client.messages.count_tokens(model="tiny", system=system, messages=HI, thinking=OFF, tools=TOOLS)
    ids, _ = encode_prompt(tiny[1], messages_submission(MessagesRequest(
        model="tiny", max_tokens=4, system=system, messages=HI, thinking=OFF, tools=TOOLS), Settings("tiny")).prompt,
        think=False)
    assert counted.input_tokens == len(ids)
    message = client.messages.create(model="tiny", max_tokens=2, system=system, messages=HI, thinking=OFF, tools=TOOLS)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted.input_tokens


def test_8_concurrent_streams_each_equal_the_request_alone(client, live):
    prompts = [[{"role": "user", "content": f"Count to {i}"}] for i in range(4)]
    ask = dict(model="tiny", max_tokens=8, thinking=OFF, extra_body={"temperature": 0})
    alone = [client.messages.create(messages=m, **ask).content[0].text for m in prompts]

    async def stream(aclient, messages):
        async with aclient.messages.stream(messages=messages, **ask) as s:
            return "".join([t async for t in s.text_stream])

    async def all_of_them():
        aclient = anthropic.AsyncAnthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(stream(aclient, prompts[i % 4]) for i in range(8)))

    assert asyncio.run(all_of_them()) == [alone[i % 4] for i in range(8)]


def test_tool_choice_any_always_gives_a_valid_call(roomy):
    for seed in range(3):
        message = roomy.messages.create(model="tiny", max_tokens=200, messages=WEATHER_Q, tools=TOOLS, thinking=OFF,
                                        tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                        extra_body={"seed": seed})
        assert message.stop_reason == "tool_use"
        (call,) = [b for b in message.content if b.type == "tool_use"]
        schema = next(t["input_schema"] for t in TOOLS if t["name"] == call.name)
        jsonschema.validate(call.input, schema)
    named = roomy.messages.create(model="tiny", max_tokens=200, messages=WEATHER_Q, tools=TOOLS, thinking=OFF,
                                  tool_choice={"type": "tool", "name": "get_time"})
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_time"]


def test_an_output_config_format_schema_parses_and_validates(roomy):
    digit = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}
    for seed in range(3):
        message = roomy.messages.create(model="tiny", max_tokens=200, messages=HI, thinking=OFF,
                                        extra_body={"output_config": {"format": {"type": "json_schema",
                                                                                 "schema": digit}}, "seed": seed})
        assert message.stop_reason == "end_turn"
        jsonschema.validate(json.loads(message.content[0].text), digit)


# ---------------------------------------------------------------- reasoning, tools and stops (scripted)


def test_thinking_comes_back_as_a_signed_block_and_text_apart(stub):
    message = stub.messages.create(model="stub", max_tokens=200, messages=HI)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == REASONING and message.content[0].signature
    assert message.content[1].text == ANSWER and message.stop_reason == "end_turn"
    with stub.messages.stream(model="stub", max_tokens=200, messages=HI) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].thinking == REASONING and final.content[0].signature == message.content[0].signature
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == REASONING
    omitted = stub.messages.create(model="stub", max_tokens=200, messages=HI,
                                   thinking={"type": "adaptive", "display": "omitted"})
    assert omitted.content[0].thinking == "" and omitted.content[0].signature


@pytest.mark.parametrize("stream", [False, True])
def test_budget_tokens_bounds_the_reasoning_and_never_shows_tags(stub, stream):
    ask = dict(model="stub", max_tokens=200, messages=HI, thinking={"type": "enabled", "budget_tokens": 5})
    if stream:
        with stub.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = stub.messages.create(**ask)
    thinking, text = message.content[0].thinking, message.content[1].text
    written = thinking.split(EARLY_STOP_TEXT.strip()[:20])[0]  # the budget's forced words close the thinking
    assert written and written != thinking and len(stub_tokenizer().encode(written)) <= 5
    assert "<think>" not in thinking + text and "</think>" not in thinking + text
    assert EARLY_STOP_TEXT.strip()[:20] not in text and text == ANSWER


def stub_tokenizer():
    from checkpoints import tokenizer_dir

    from qwen3_mlx.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir())


def test_thinking_disabled_gives_no_thinking_block(stub):
    message = stub.messages.create(model="stub", max_tokens=200, messages=HI, thinking=OFF)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip(stub, stream):
    ask = dict(model="stub", max_tokens=200, messages=WEATHER_Q, tools=TOOLS)
    if stream:
        with stub.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = stub.messages.create(**ask)
    calls = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"}),
                                                  ("get_time", {"zone": "CET"})]
    results = [{"type": "tool_result", "tool_use_id": c.id, "content": "18 C"} for c in calls]
    turn = WEATHER_Q + [{"role": "assistant", "content": [b.model_dump() for b in message.content]},
                        {"role": "user", "content": [*results, {"type": "text", "text": "Thanks! And 2+2?"}]}]
    again = stub.messages.create(model="stub", max_tokens=200, messages=turn, tools=TOOLS)
    assert again.stop_reason in ("end_turn", "tool_use")
    single = stub.messages.create(**ask, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.name for b in single.content if b.type == "tool_use"] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_end_the_answer_and_name_the_one_met(stub, stream):
    ask = dict(model="stub", max_tokens=200, messages=HI, stop_sequences=["nothing", "is 4"])
    if stream:
        with stub.messages.stream(**ask) as s:
            message = s.get_final_message()
    else:
        message = stub.messages.create(**ask)
    assert message.content[-1].text == "The answer "
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "is 4"


def test_max_tokens_caps_the_thinking_too(stub):
    message = stub.messages.create(model="stub", max_tokens=6, messages=HI)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 6


def test_a_reply_cut_inside_a_call_is_the_same_whole_and_streamed(stub, tiny):
    cut = CALLS[: CALLS.index('{"zone"') + 4]
    ask = dict(model="stub", messages=WEATHER_Q, tools=TOOLS,
               max_tokens=len(tiny[1].encode(f"<think>\nI should call the tools.\n</think>\n\n{cut}")))
    whole = stub.messages.create(**ask)
    with stub.messages.stream(**ask) as s:
        streamed = s.get_final_message()
    assert whole.stop_reason == streamed.stop_reason == "max_tokens"
    blocks = [b.model_dump(exclude={"id", "signature"}) for b in whole.content]
    assert blocks == [b.model_dump(exclude={"id", "signature"}) for b in streamed.content]
    assert [b["type"] for b in blocks] == ["thinking", "tool_use", "tool_use"]
    assert blocks[1]["input"] == {"city": "Paris", "unit": "C"} and blocks[2]["name"] == "get_time"
    assert whole.id.startswith("msg_") and all(b.id.startswith("toolu_") for b in whole.content[1:])


def test_what_claude_code_sends_is_accepted(stub, tiny):
    """System blocks with cache_control, a system message inside messages, adaptive thinking omitted,
    effort, context_management, metadata, a server tool, ?beta=true and the beta headers."""
    body = {"model": "stub", "max_tokens": 32000, "stream": False,
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control":
                                                       {"type": "ephemeral"}}]},
                         {"role": "system", "content": "The date is today."}],
            "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {
                "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
                      {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
            "thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "metadata": {"user_id": "someone"}, "unknown_field": 1}
    url = str(stub.base_url).rstrip("/")
    response = post(url, body, "/v1/messages?beta=true",
                    headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"})
    assert response.status_code == 200, response.text
    assert response.json()["content"][-1] == {"type": "text", "text": ANSWER, "citations": None}
    streamed = post(url, {**body, "stream": True}, "/v1/messages?beta=true")
    names = [line.split(": ", 1)[1] for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    prompt = messages_submission(MessagesRequest.model_validate(body), Settings("stub")).prompt
    text = tiny[1].decode(encode_prompt(tiny[1], prompt)[0])
    assert "<|im_start|>system\nThe date is today.<|im_end|>" in text and "web_search" not in text


def test_pings_go_out_while_nothing_comes():
    async def slow():
        await asyncio.sleep(0.25)
        yield "first"

    async def read():
        return [item async for item in with_pings(slow(), 0.05)]

    items = asyncio.run(read())
    assert items[-1] == "first" and items.count(None) >= 3


# ---------------------------------------------------------------- reasoning carried back in the signature


@pytest.fixture(scope="module")
def looped(tiny):
    """The scripted model, which calls the tools whenever the weather is asked about (in every step of a
    tool loop), one row at a time so that its `fed` is the request's; its client."""
    tok = tiny[1]
    model = ScriptedModel(by_prompt(tok, {"weather": replies(tok, "I should call the tools.", CALLS)},
                                    replies(tok, REASONING, ANSWER)), tok.encode(HEADER))
    with Engine(model, tok, max_batch=1) as engine, served(engine, "stub", max_tokens=200) as server:
        yield anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60), model


def altered(sealed: str) -> str:
    """`sealed` with one character of its MAC changed."""
    return sealed[:10] + ("A" if sealed[10] != "A" else "B") + sealed[11:]


def tool_loop(looped, display: str | None, spoil=lambda signature: signature) -> list[list[int]]:
    """Three steps of Claude Code's loop (each reply's blocks sent back with a result per call): the
    prompt ids the model read at each."""
    client, model = looped
    thinking = {"type": "adaptive", **({"display": display} if display else {})}
    messages, prompts = list(WEATHER_Q), []
    for _ in range(3):
        reply = client.messages.create(model="stub", max_tokens=200, messages=messages, tools=TOOLS, thinking=thinking)
        prompts.append(model.split(model.fed)[0])
        blocks = [b.model_dump(exclude={"citations"}) for b in reply.content]
        for block in blocks:
            if block["type"] == "thinking":
                block["signature"] = spoil(block["signature"])
        results = [{"type": "tool_result", "tool_use_id": b["id"], "content": "18 C"} for b in blocks
                   if b["type"] == "tool_use"]
        messages += [{"role": "assistant", "content": blocks}, {"role": "user", "content": results}]
    return prompts


def test_display_omitted_gives_the_model_its_reasoning_as_shown_thinking_does(looped, tiny):
    omitted = tool_loop(looped, "omitted")
    assert omitted == tool_loop(looped, None)
    text = tiny[1].decode(omitted[2])  # the template keeps the reasoning of the turns after the question
    assert text.count("<think>\nI should call the tools.\n</think>") == 2
    # A signature altered, or sealed by another server, is ignored: the reasoning is left out.
    forged = tool_loop(looped, "omitted", spoil=altered)
    assert forged[0] == omitted[0] and "I should call the tools." not in tiny[1].decode(forged[2])


# ---------------------------------------------------------------- errors in Anthropic's shape


def anthropic_error(response, status, kind):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def test_a_wrong_key_is_401_and_both_headers_pass(engine):
    with served(engine, "tiny", api_key="s3cret") as server:
        ask = dict(model="tiny", max_tokens=2, messages=HI)
        with pytest.raises(anthropic.AuthenticationError, match="invalid or missing API key"):
            anthropic.Anthropic(base_url=server.url, api_key="guess", max_retries=0).messages.create(**ask)
        anthropic_error(post(server.url, ask), 401, "authentication_error")
        assert anthropic.Anthropic(base_url=server.url, api_key="s3cret", max_retries=0).messages.create(**ask).id
        bearer = anthropic.Anthropic(base_url=server.url, auth_token="s3cret", max_retries=0)
        assert bearer.messages.create(**ask).id
        # Other routes keep OpenAI's shape.
        assert "message" in httpx.get(server.url + "/v1/models").json()["error"]


REFUSALS = [
    ({"model": "tiny", "messages": HI}, 400, "invalid_request_error", "max_tokens: "),
    ({"model": "tiny", "max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages: "),
    ({"model": "claude-opus", "max_tokens": 4, "messages": HI}, 404, "not_found_error", "'claude-opus' does not exist"),
    ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     400, "invalid_request_error", "messages[0].content[0] is type 'image'"),
    ({"model": "tiny", "max_tokens": 4, "messages": HI, "thinking": {"type": "enabled"}},
     400, "invalid_request_error", 'thinking.budget_tokens: {"type": "enabled"} needs budget_tokens, the most thinking '
                                   'tokens (or use {"type": "adaptive"})'),
    ({"model": "tiny", "max_tokens": 4, "messages": HI, "tools": TOOLS, "tool_choice": {"type": "tool"}},
     400, "invalid_request_error", 'tool_choice.name: {"type": "tool"} needs the name of the tool to call'),
    ({"model": "tiny", "max_tokens": 4, "messages": HI, "tools": TOOLS + TOOLS[:1]},
     400, "invalid_request_error", "tools: more than one tool is named 'get_weather'"),
    ({"model": "tiny", "max_tokens": 4, "messages": HI, "stop_sequences": [""]},
     400, "invalid_request_error", "a stop string must be non-empty"),
    ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x " * 5000}]},
     400, "invalid_request_error", "the model's context is 4096"),
]


@pytest.mark.parametrize(("body", "status", "kind", "message"), REFUSALS, ids=range(len(REFUSALS)))
def test_refusals_have_anthropics_error_body(live, body, status, kind, message):
    text = anthropic_error(post(live.url, body), status, kind)
    assert message in text
    if message.endswith(": ") and text.startswith(message):  # a pydantic reason, carried as pydantic gives it
        with pytest.raises(pydantic.ValidationError) as e:
            MessagesRequest.model_validate(body)
        assert text == message + e.value.errors()[0]["msg"]


USE = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}]}
# What Anthropic's API refuses, refused here in our words naming the field (each once answered 200, then ran
# to the cap, or named the server's files): (the body's fields, the message).
REFERENCE_REFUSALS = [
    ({"tool_choice": {"type": "any"}}, "tool_choice: given without tools; send tools, or leave tool_choice out"),
    ({"tool_choice": {"type": "tool", "name": "get_time"}},
     "tool_choice: given without tools; send tools, or leave tool_choice out"),
    ({"extra_body": {"temperature": 1.5}}, "temperature must be in [0, 1], got 1.5"),  # this SDK has no temperature
    ({"messages": [*HI, USE, {"role": "user", "content": [{"type": "tool_result", "content": "12:00"}]}]},
     "messages[2].content[0].tool_use_id: a tool result needs the id of the call it answers"),
    ({"messages": [*HI, USE, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
                                                          "content": "12:00"}]}]},
     "messages[2].content[0].tool_use_id: no earlier tool call has the id 'toolu_9'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
     "messages[0].content[0].text: a text block must hold some text"),
    ({"messages": [{"role": "user", "content": []}]},
     "messages[0].content: give at least one content block (only a last assistant message may be empty)"),
    ({"messages": [{"role": "assistant", "content": "Hello"}]},
     "messages: the conversation must hold a user message"),
]


@pytest.mark.parametrize(("fields", "message"), REFERENCE_REFUSALS, ids=[m for _, m in REFERENCE_REFUSALS])
def test_what_anthropic_refuses_is_refused_in_our_words(client, fields, message):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**{"model": "tiny", "max_tokens": 4, "messages": HI, **fields})
    assert e.value.status_code == 400
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


@given(refusal=st.sampled_from(REFERENCE_REFUSALS), stream=st.booleans(), max_tokens=st.integers(1, 8),
       system=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
       thinking=st.sampled_from([None, OFF, {"type": "adaptive", "display": "omitted"},
                                 {"type": "enabled", "budget_tokens": 4}]))
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_bodies_the_reference_refuses_are_400s(live, refusal, stream, max_tokens, system, thinking):
    """The refused shapes amid other fields, streamed or not: a 400 with our words, never a 200 or a 5xx."""
    fields, message = refusal
    body = {"model": "tiny", "max_tokens": max_tokens, "messages": HI, "stream": stream,
            **{k: v for k, v in (("system", system), ("thinking", thinking)) if v is not None},
            **fields.get("extra_body", fields)}
    response = post(live.url, body)
    assert anthropic_error(response, 400, "invalid_request_error") == message


def test_a_body_over_the_limit_and_bad_json_have_anthropics_shape(live, client):
    big = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    anthropic_error(post(live.url, big), 413, "request_too_large")
    bad = httpx.post(live.url + "/v1/messages/count_tokens", content=b"{", headers={"content-type": "application/json"})
    assert "not valid JSON" in anthropic_error(bad, 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="other", max_tokens=4, messages=HI)


def test_no_input_makes_a_server_error(live):
    """Bodies made from /openapi.json for both routes, valid and invalid: every answer is a 2xx or a 4xx."""
    fuzz_routes(live.url, lambda path: path.startswith("/v1/messages"),
                ["/v1/messages", "/v1/messages/count_tokens"], 60)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"model": "tiny", "max_tokens": 4000, "stream": True,
                      "messages": [{"role": "user", "content": "Talk forever"}]}),
    ("/v1/responses", {"input": "Talk forever", "stream": True}),
])
def test_a_stream_whose_client_goes_away_frees_its_row(tiny, path, body):
    """Anthropic's and the Responses API's streams, as chat's: the row is cancelled when the client leaves."""
    import time

    from test_web import endless

    model = ScriptedModel(endless(tiny[1]), tiny[1].encode("<|im_start|>assistant\n"))
    with Engine(model, tiny[1], max_batch=1) as engine, served(engine, "tiny", max_tokens=4000) as server:
        with httpx.Client(timeout=30) as http, http.stream("POST", server.url + path, json=body) as response:
            lines = response.iter_lines()
            while "delta" not in next(lines):
                pass
            assert engine.rows == 1
        start = time.monotonic()
        while engine.rows and time.monotonic() - start < 5:
            time.sleep(0.02)
        assert engine.rows == 0
