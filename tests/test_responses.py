"""OpenAI's Responses API: the real `openai` SDK's client.responses.create against live servers on the tiny
random checkpoint (whose text must equal the library's) and on a scripted stub that reasons and calls
tools; the store behind previous_response_id; what Codex sends; fuzzing from /openapi.json."""

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_live import ANSWER, HEADER, REASONING, fuzz_routes, served, stub_server
from stubs import ScriptedModel, by_prompt, replies

from qwen3_mlx import GenerationOptions, generate
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.server.responses.mapping import input_messages, offered_tools
from qwen3_mlx.server.responses.protocol import ResponsesRequest
from qwen3_mlx.server.responses.store import ResponseStore
from qwen3_mlx.server.submission.refusal import ApiError
from qwen3_mlx.server.submission.sealed import seal

CAP = 32
HI = [{"role": "user", "content": "Hello there"}]
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "clock.now", "arguments": {"zone": "CET"}}\n</tool_call>')
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": False}
CLOCK = {"type": "namespace", "name": "clock", "description": "Time", "tools": [
    {"type": "function", "name": "now", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}]}
NO_THINK = {"reasoning": {"effort": "none"}}
KEY = b"k" * 32  # the stub server's secret key


@pytest.fixture(scope="module")
def live(engine):
    with served(engine, "tiny", max_tokens=400) as server:
        yield server


@pytest.fixture(scope="module")
def small(engine):
    """A cap of 8 tokens, for bodies that ask for many (refusals, fuzzing)."""
    with served(engine, "tiny", max_tokens=8) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(tiny):
    """A scripted model that reasons then answers, or calls a tool and a namespaced one about the weather."""
    with stub_server(tiny[1], CALLS, max_tokens=200, secret_key=KEY) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def events_of(stream):
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


# ---------------------------------------------------------------- the tiny checkpoint: equal to the library


def test_text_equals_the_library_whole_and_streamed(client, tiny):
    ask = dict(model="tiny", input="Hello there", max_output_tokens=12, temperature=0, **NO_THINK)
    response = client.responses.create(**ask)
    alone = generate(*tiny, HI, GenerationOptions(thinking_budget=0, max_tokens=12, max_total_tokens=12, temp=0))
    assert response.output_text == alone.content and response.status in ("completed", "incomplete")
    assert response.usage.input_tokens == alone.stats.prompt_tokens
    assert response.usage.output_tokens == len(alone.stats.token_ids)
    events = events_of(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{response.status}"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == alone.content
    assert events[-1].response.output_text == alone.content
    assert events[-1].response.usage.input_tokens_details.cached_tokens > 0


def test_previous_response_id_equals_sending_the_whole_history(client):
    ask = dict(model="tiny", max_output_tokens=10, temperature=0, **NO_THINK)
    first = client.responses.create(input="Hello there", instructions="Be terse.", **ask)
    second = [{"role": "user", "content": "And again?"}]
    stored = client.responses.create(previous_response_id=first.id, input=second, instructions="Be terse.", **ask)
    history = [{"role": "user", "content": "Hello there"}, *[item.model_dump(exclude_none=True)
                                                              for item in first.output], *second]
    whole = client.responses.create(input=history, instructions="Be terse.", store=False, **ask)
    assert stored.output_text == whole.output_text
    assert stored.usage.input_tokens == whole.usage.input_tokens
    assert stored.usage.output_tokens == whole.usage.output_tokens
    assert stored.previous_response_id == first.id and client.responses.retrieve(stored.id).id == stored.id
    with pytest.raises(openai.NotFoundError, match="no response 'resp_nothing' is stored here"):
        client.responses.create(previous_response_id="resp_nothing", input="x", **ask)
    unstored = client.responses.create(input="x", store=False, **ask)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(previous_response_id=unstored.id, input="y", **ask)


def test_an_evicted_response_says_so(engine):
    store = ResponseStore(max_count=1)
    with served(engine, "tiny", response_store=store) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        ask = dict(model="tiny", max_output_tokens=2, **NO_THINK)
        first = client.responses.create(input="one", **ask)
        client.responses.create(input="two", **ask)
        with pytest.raises(openai.NotFoundError, match="was evicted") as e:
            client.responses.create(previous_response_id=first.id, input="three", **ask)
        assert e.value.body["code"] == "response_evicted"


def test_the_store_is_bounded_in_bytes():
    store = ResponseStore(max_count=10, max_bytes=300)
    for i in range(5):
        store.put(f"r{i}", [{"type": "message", "role": "user", "content": "x" * 100}], {})
    assert store.get("r4")[0][0]["content"] == "x" * 100
    with pytest.raises(ApiError, match="was evicted"):
        store.get("r0")


def test_a_json_schema_format_parses(client):
    digit = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "digit", "schema": digit, "strict": True}}
    for seed in range(3):
        response = client.responses.create(model="tiny", input="A digit?", text=fmt, extra_body={"seed": seed},
                                           **NO_THINK)
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), digit)
    events = events_of(client.responses.create(model="tiny", input="A digit?", text=fmt, stream=True, **NO_THINK))
    jsonschema.validate(json.loads(events[-1].response.output_text), digit)


def test_max_output_tokens_makes_it_incomplete(client):
    response = client.responses.create(model="tiny", input="Hello", max_output_tokens=3, temperature=0, **NO_THINK)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


# ---------------------------------------------------------------- reasoning and tools (scripted)


def test_reasoning_items_carry_the_text_and_encrypted_content_read_back(stub):
    response = stub.responses.create(model="stub", input="Hello there", include=["reasoning.encrypted_content"],
                                     store=False)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == REASONING and reasoning.summary == []
    assert message.content[0].text == ANSWER and response.usage.output_tokens_details.reasoning_tokens > 0
    assert reasoning.encrypted_content == seal(REASONING, KEY)
    events = events_of(stub.responses.create(model="stub", input="Hello there", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    assert [e.type for e in events if e.type.endswith(".done")].count("response.output_item.done") == 2
    # Codex sends the reasoning back with its encrypted_content alone: read back as its text.
    only_encrypted = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": seal(REASONING, KEY)}
    turn = [{"role": "user", "content": "Hi"}, only_encrypted,
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"}]
    assert input_messages(turn, {}, key=KEY)[1]["reasoning_content"] == REASONING
    assert "reasoning_content" not in input_messages(turn, {}, key=b"another server's key")[1]


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_and_their_outputs_in_the_next_turn(stub, stream):
    ask = dict(model="stub", input="What is the weather in Paris?", tools=[WEATHER, CLOCK])
    if stream:
        events = events_of(stub.responses.create(**ask, stream=True))
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert json.loads(args.split("}")[0] + "}") == {"city": "Paris"}
        response = events[-1].response
    else:
        response = stub.responses.create(**ask)
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.namespace, c.name, json.loads(c.arguments)) for c in calls] == [
        (None, "get_weather", {"city": "Paris"}), ("clock", "now", {"zone": "CET"})]
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 C"} for c in calls]
    again = stub.responses.create(model="stub", tools=[WEATHER, CLOCK], input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in response.output], *outputs])
    assert again.status == "completed"
    single = stub.responses.create(**ask, parallel_tool_calls=False)
    assert [item.name for item in single.output if item.type == "function_call"] == ["get_weather"]


def without_ids(items):
    return [{k: v for k, v in item.model_dump(exclude_none=True).items() if k not in ("id", "call_id")}
            for item in items]


@pytest.mark.parametrize("cut_at", ['{"zone"', "the answer"])
def test_a_cut_reply_is_the_same_whole_and_streamed(stub, tiny, cut_at):
    """A call the cap cut is an incomplete function_call, a message it cut an incomplete message."""
    calls = cut_at != "the answer"
    text = f"<think>\nI should call the tools.\n</think>\n\n{CALLS[: CALLS.index(cut_at) + 4]}" if calls \
        else f"<think>\n{REASONING}\n</think>\n\n"
    ask = dict(model="stub", input="What is the weather in Paris?" if calls else "Hi",
               tools=[WEATHER, CLOCK] if calls else [],  # the tools' names make the stub call them
               max_output_tokens=len(tiny[1].encode(text)) + (0 if calls else 2))  # two of the answer's tokens
    whole = stub.responses.create(**ask)
    streamed = events_of(stub.responses.create(**ask, stream=True))[-1].response
    assert whole.status == streamed.status == "incomplete"
    assert without_ids(whole.output) == without_ids(streamed.output)
    kinds = [(item.type, item.status) for item in whole.output]
    if calls:
        assert kinds == [("reasoning", "completed"), ("function_call", "completed"), ("function_call", "incomplete")]
        assert whole.output[2].name == "now" and whole.output[2].arguments == '{"zone'
    else:
        assert kinds == [("reasoning", "completed"), ("message", "incomplete")]
    assert whole.id.startswith("resp_") and [item.id[:3] for item in whole.output] == \
        ["rs_", *(["fc_", "fc_"] if calls else ["msg"])]
    assert not calls or all(item.call_id.startswith("call_") for item in whole.output[1:])


@pytest.fixture(scope="module")
def looped(tiny):
    """The scripted model calling the tools in every step of a loop, one row at a time (its `fed` is the
    request's), and its client."""
    tok = tiny[1]
    model = ScriptedModel(by_prompt(tok, {"weather": replies(tok, "I should call the tools.", CALLS)},
                                    replies(tok, REASONING, ANSWER)), tok.encode(HEADER))
    with Engine(model, tok, max_batch=1) as engine, served(engine, "stub", max_tokens=200) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60), model


def altered(sealed: str) -> str:
    """`sealed` with one character of its MAC changed."""
    return sealed[:10] + ("A" if sealed[10] != "A" else "B") + sealed[11:]


def tool_loop(looped, keep: str, spoil=lambda sealed: sealed) -> list[list[int]]:
    """Three steps of Codex's loop (store false, the whole conversation sent each time, reasoning items
    carrying `keep`: their content, or their encrypted_content alone): the prompt ids the model read."""
    client, model = looped
    items, prompts = [{"role": "user", "content": "What is the weather in Paris?"}], []
    for _ in range(3):
        reply = client.responses.create(model="stub", input=items, tools=[WEATHER, CLOCK], store=False,
                                        include=["reasoning.encrypted_content"])
        prompts.append(model.split(model.fed)[0])
        for item in reply.output:
            sent = item.model_dump(exclude_none=True)
            if item.type == "reasoning":
                sent.pop("content" if keep == "encrypted_content" else "encrypted_content")
                sent["encrypted_content"] = spoil(sent.get("encrypted_content", ""))
            items.append(sent)
        items += [{"type": "function_call_output", "call_id": item.call_id, "output": "18 C"} for item in reply.output
                  if item.type == "function_call"]
    return prompts


def test_encrypted_content_alone_gives_the_model_its_reasoning(looped, tiny):
    encrypted = tool_loop(looped, "encrypted_content")
    assert encrypted == tool_loop(looped, "content")
    assert tiny[1].decode(encrypted[2]).count("<think>\nI should call the tools.\n</think>") == 2
    forged = tool_loop(looped, "encrypted_content", spoil=altered)
    assert "I should call the tools." not in tiny[1].decode(forged[2])


def test_namespace_tools_are_offered_under_qualified_names_and_others_left_out():
    tools, names = offered_tools([WEATHER, CLOCK, {"type": "web_search"}, {"type": "custom", "name": "apply_patch"}])
    assert [t["function"]["name"] for t in tools] == ["get_weather", "clock.now"]
    assert names == {"get_weather": (None, "get_weather"), "clock.now": ("clock", "now")}
    call = {"type": "function_call", "call_id": "c", "namespace": "clock", "name": "now", "arguments": "{}"}
    assert input_messages([call], {v: k for k, v in names.items()})[0]["tool_calls"][0]["function"]["name"] == \
        "clock.now"


def test_what_codex_sends_is_accepted(stub):
    body = {"model": "stub", "instructions": "You are Codex.", "stream": True, "store": False,
            "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "medium", "summary": "auto"},
            "prompt_cache_key": "abc", "client_metadata": {"x": "y"}, "tool_choice": "auto",
            "parallel_tool_calls": True, "text": {"verbosity": "low"},
            "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "tools": [{"type": "function", "name": "shell", "strict": False, "parameters": {
                "type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}},
                      CLOCK, {"type": "web_search", "external_web_access": False}]}
    url = str(stub.base_url).rstrip("/")
    response = httpx.post(url + "/responses", json=body, timeout=60)
    assert response.status_code == 200, response.text
    names = [line.split(": ", 1)[1] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    last = json.loads(response.text.strip().splitlines()[-1].removeprefix("data: "))
    assert last["response"]["output"][0]["encrypted_content"] == seal(REASONING, KEY)


REFUSALS = [
    ({"input": "x", "model": "gpt-5"}, 404, "the model 'gpt-5' does not exist"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input[0].content[0] is type 'input_image'"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, "input[0].role: 'tool' is not"),
    ({"input": "x", "tool_choice": {"type": "web_search"}, "tools": [WEATHER]}, 400,
     'tool_choice: {"type": "web_search"} cannot be honoured here; give "auto", "none", "required" or {"type": '
     '"function", "name": ...}'),
    ({"input": "x", "tools": [WEATHER, WEATHER]}, 400, "tools: more than one tool is named 'get_weather'"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens must be >= 1, got 0"),
    ({"input": "x " * 5000}, 400, "context is 4096"),
]


@pytest.mark.parametrize(("body", "status", "message"), REFUSALS, ids=range(len(REFUSALS)))
def test_refusals_have_openais_error_body(small, body, status, message):
    response = httpx.post(small.url + "/v1/responses", json=body, timeout=60)
    assert response.status_code == status, response.text
    text = response.json()["error"]["message"]
    assert message in text
    if message.endswith(": ") and text.startswith(message):  # a pydantic reason, carried as pydantic gives it
        with pytest.raises(pydantic.ValidationError) as e:
            ResponsesRequest.model_validate(body)
        assert text == message + e.value.errors()[0]["msg"]


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
# What OpenAI's Responses API refuses, refused here in our words naming the field (each once answered 200,
# then ran to the cap, or named the server's files): (the body's fields, the message, the parameter).
REFERENCE_REFUSALS = [
    ({"tool_choice": "required"}, "tool_choice: given without tools; send tools, or leave tool_choice out",
     "tool_choice"),
    ({"input": [{"role": "user", "content": "Hi"}, CALL, {"type": "function_call_output", "output": "18 C"}]},
     "input[2].call_id: a tool result needs the id of the call it answers", "input[2].call_id"),
    ({"input": [{"role": "user", "content": "Hi"}, CALL,
                {"type": "function_call_output", "call_id": "call_9", "output": "18 C"}]},
     "input[2].call_id: no earlier tool call has the id 'call_9'", "input[2].call_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}},
     'text.format.schema: a "json_schema" format needs its schema (or use {"type": "json_object"})',
     "text.format.schema"),
    ({"input": []}, "input: give at least one message", "input"),
    ({"input": [{"type": "hologram"}]}, 'input[0].type: unknown item type "hologram"', "input[0].type"),
    ({"input": [{"role": "assistant", "content": "Hello"}]}, "input: the conversation must hold a user message",
     "input"),
]


@pytest.mark.parametrize(("fields", "message", "param"), REFERENCE_REFUSALS, ids=[m for _, m, _ in REFERENCE_REFUSALS])
def test_what_openai_refuses_is_refused_in_our_words(small, fields, message, param):
    client = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**{"model": "tiny", "input": "hi", **fields})
    assert e.value.status_code == 400
    assert e.value.body == {"message": message, "type": "invalid_request_error", "param": param, "code": None}


@given(refusal=st.sampled_from(REFERENCE_REFUSALS), stream=st.booleans(), store=st.booleans(),
       instructions=st.one_of(st.none(), st.text(min_size=1, max_size=20)),
       effort=st.sampled_from([None, "none", "low"]), include=st.booleans())
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_bodies_the_reference_refuses_are_400s(small, refusal, stream, store, instructions, effort, include):
    """The refused shapes amid other fields, streamed or not: a 400 with our words, never a 200 or a 5xx."""
    fields, message, param = refusal
    body = {"model": "tiny", "input": "hi", "stream": stream, "store": store, "max_output_tokens": 4, **fields,
            **({"instructions": instructions} if instructions else {}),
            **({"reasoning": {"effort": effort}} if effort else {}),
            **({"include": ["reasoning.encrypted_content"]} if include else {})}
    response = httpx.post(small.url + "/v1/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}


def test_a_stored_conversations_calls_are_answered_by_a_later_output(stub):
    first = stub.responses.create(model="stub", input="What is the weather in Paris?", tools=[WEATHER, CLOCK])
    (call, *_) = [item for item in first.output if item.type == "function_call"]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}
    again = stub.responses.create(model="stub", previous_response_id=first.id, input=[output], tools=[WEATHER, CLOCK])
    assert again.status == "completed"


RESPONSES_ROUTES = ["/v1/responses", "/v1/responses/{response_id}"]


def test_no_input_makes_a_server_error(small):
    """Bodies made from /openapi.json for /v1/responses, valid and invalid: every answer is a 2xx or a 4xx."""
    live = small
    fuzz_routes(live.url, lambda path: path.startswith("/v1/responses"), RESPONSES_ROUTES, 60)
