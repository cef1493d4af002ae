"""The server as clients nobody here wrote see it: null for "not given" on every optional field; every
field of OpenAI's response objects, null when empty; finish_reason "length" when the cap cut the reply;
model ids holding "/"; OpenAI's refusals, each naming its parameter; the library's refusals mapped to
OpenAI's codes."""

import inspect
import json

import httpx
import openai
import pytest
from server_live import ServeProcess, served, stub_server

from qwen3_mlx.generation.engine import EngineFull
from qwen3_mlx.errors import ContextLengthError, MemoryLimitError, Qwen3Error
from qwen3_mlx.server.openai.protocol import ChatCompletionRequest, CompletionRequest
from qwen3_mlx.server.submission.reading import thinking_budget
from qwen3_mlx.server.submission.sealed import load_key, seal, unseal

HI = [{"role": "user", "content": "Hello there"}]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
HUB_ID = "mlx-community/Qwen3-1.7B-4bit"
PATH_ID = "/models/qwen3 1.7b/./4bit"
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


class RefusingEngine:
    """An engine whose every submit raises `error`: what the app makes of the library's refusals."""

    rows = 0
    tokenizer = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    def submit(self, *args, **kwargs):
        raise self.error


@pytest.fixture(scope="module")
def live(engine):
    """The tiny checkpoint, served under a Hub id and, as an alias, a path."""
    with served(engine, HUB_ID, PATH_ID, max_tokens=16) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(tiny):
    """A scripted model that reasons then answers, or calls two tools (CALLS) when asked about the weather."""
    with stub_server(tiny[1], CALLS, reasoning="Let me think.", answer="The answer is 4.") as s:
        yield s


def post(url, body, path="/v1/chat/completions", **kwargs):
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


def events(response):
    """The JSON events of a server-sent stream, [DONE] checked and left out."""
    lines = [line[6:] for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---------------------------------------------------------------- null means not given


def sdk_nones(create) -> dict:
    """None for every optional argument of an SDK method, but the SDK's own request options."""
    own = {"extra_headers", "extra_query", "extra_body", "timeout"}
    return {name: None for name, parameter in inspect.signature(create).parameters.items()
            if parameter.default is not inspect.Parameter.empty and name not in own}


def test_the_sdk_given_none_for_every_optional_argument_gets_a_reply(client):
    chat = client.chat.completions.create(model=HUB_ID, messages=HI, **sdk_nones(client.chat.completions.create))
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 16
    text = client.completions.create(model=HUB_ID, prompt="Once upon", **sdk_nones(client.completions.create))
    assert text.choices[0].finish_reason in ("stop", "length") and text.usage.completion_tokens <= 16


def nulls(model) -> dict:
    return {name: None for name, field in model.model_fields.items() if not field.is_required()}


NULL_MESSAGES = [{"role": "system", "content": "Be brief.", "name": None, "tool_calls": None, "tool_call_id": None,
                  "reasoning_content": None},
                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": None, "type": None, "function": {"name": "get_weather", "arguments": None}}]},
                 {"role": "tool", "content": "18 C", "tool_call_id": None}]
NULL_TOOLS = [{"type": None, "function": {"name": "get_weather", "description": None, "parameters": None,
                                          "strict": None}}]


@pytest.mark.parametrize("body", [
    {**nulls(ChatCompletionRequest), "messages": NULL_MESSAGES},
    {"messages": HI, "stream_options": {"include_usage": None}, "response_format": {"type": None}},
    {"messages": HI, "tools": NULL_TOOLS, "tool_choice": {"type": None, "function": {"name": "get_weather"}}},
    {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "any", "description": None, "schema": None, "strict": None}}},
], ids=["every-field", "stream-options", "tools", "json-schema"])
def test_null_on_any_optional_chat_field_means_not_given(live, body):
    response = post(live.url, {**body, "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_null_on_any_optional_completion_field_means_not_given(live):
    response = post(live.url, {**nulls(CompletionRequest), "prompt": "Once upon", "max_tokens": 4}, "/v1/completions")
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "text_completion"


# ---------------------------------------------------------------- every field of OpenAI's objects

COMPLETION = {"id", "object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint"}
CHOICE = {"index", "message", "logprobs", "finish_reason"}
MESSAGE = {"role", "content", "refusal", "tool_calls", "reasoning_content", "reasoning"}
CHUNK = COMPLETION
CHUNK_CHOICE = {"index", "delta", "logprobs", "finish_reason"}
DELTA = {"role", "content", "refusal", "tool_calls", "reasoning_content", "reasoning"}
TEXT_COMPLETION = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
TEXT_CHOICE = {"index", "text", "logprobs", "finish_reason", "reasoning_content", "reasoning"}


def test_a_reply_without_reasoning_or_calls_sends_them_as_null(live, client):
    body = post(live.url, {"messages": HI, "max_tokens": 4, **NO_THINK}).json()
    assert set(body) == COMPLETION and set(body["choices"][0]) == CHOICE
    message = body["choices"][0]["message"]
    assert set(message) == MESSAGE
    assert {k: message[k] for k in ("refusal", "tool_calls", "reasoning_content", "reasoning")} == dict.fromkeys(
        ("refusal", "tool_calls", "reasoning_content", "reasoning"))
    assert body["choices"][0]["logprobs"] is None and body["system_fingerprint"] is None
    # The README's example reads reasoning_content through the SDK.
    reply = client.chat.completions.create(model=HUB_ID, messages=HI, max_tokens=4, extra_body=NO_THINK)
    assert reply.choices[0].message.reasoning_content is None


def test_tool_calls_come_with_content_null(stub):
    body = post(stub.url, {"messages": WEATHER_Q, "tools": WEATHER}).json()
    message = body["choices"][0]["message"]
    assert set(message) == MESSAGE and message["content"] is None and len(message["tool_calls"]) == 2
    assert message["reasoning_content"] == message["reasoning"] == "I should call the tools."


def test_stream_chunks_carry_every_field_and_usage_null_until_the_last(stub):
    chunks = events(post(stub.url, {"messages": HI, "stream": True, "stream_options": {"include_usage": True}}))
    assert all(set(c) == CHUNK for c in chunks)
    assert all(set(c["choices"][0]) == CHUNK_CHOICE and set(c["choices"][0]["delta"]) == DELTA
               for c in chunks[:-1])
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    # The stub finds no assistant turn in a raw prompt and writes <think> for ever: a few tokens are enough.
    text = events(post(stub.url, {"prompt": "x", "stream": True, "stream_options": {"include_usage": True},
                                  "max_tokens": 8}, "/v1/completions"))
    assert all(set(c) == TEXT_COMPLETION for c in text)
    assert all(set(c["choices"][0]) == TEXT_CHOICE for c in text[:-1])
    assert [c["usage"] for c in text[:-1]] == [None] * (len(text) - 1) and text[-1]["usage"] is not None


def test_streamed_call_fragments_name_the_call_once(stub):
    fragments = [call for c in events(post(stub.url, {"messages": WEATHER_Q, "tools": WEATHER, "stream": True}))
                 if c["choices"] for call in c["choices"][0]["delta"]["tool_calls"] or ()]
    firsts = [f for f in fragments if "id" in f]
    assert [(set(f), f["function"]["name"]) for f in firsts] == [({"index", "id", "type", "function"}, "get_weather"),
                                                                  ({"index", "id", "type", "function"}, "get_time")]
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"}
               for f in fragments if "id" not in f)


# ---------------------------------------------------------------- finish_reason "length" when cut


def test_a_cap_inside_a_call_is_finish_reason_length_after_complete_calls(stub, tiny):
    # The cap falls inside the second call's arguments.
    cut = CALLS[: CALLS.index('{"zone"') + 4]
    body = {"messages": WEATHER_Q, "tools": WEATHER,
            "max_tokens": len(tiny[1].encode(f"<think>\nI should call the tools.\n</think>\n\n{cut}"))}
    reply = post(stub.url, body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
    assert [name for _, name, _ in calls] == ["get_weather", "get_time"]
    assert calls[0][2] == '{"city": "Paris", "unit": "C"}' and calls[1][2] == '{"zone'  # cut, as OpenAI sends it
    chunks = events(post(stub.url, {**body, "stream": True}))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # The whole reply carries what the stream carried: the cut call too, its arguments so far.
    fragments = [f for c in chunks if c["choices"] for f in c["choices"][0]["delta"]["tool_calls"] or ()]
    streamed = [(f["id"], f["function"]["name"], "".join(g["function"]["arguments"] for g in fragments
                                                         if g["index"] == f["index"])) for f in fragments if "id" in f]
    assert [(name, arguments) for _, name, arguments in streamed] == [(name, arguments) for _, name, arguments in calls]
    assert all(cid.startswith("call_") for cid, _, _ in calls + streamed) and reply["id"].startswith("chatcmpl-")


# ---------------------------------------------------------------- models


def test_model_ids_holding_slashes_are_found_and_aliases_accepted(client, live):
    assert [m.id for m in client.models.list().data] == [HUB_ID]
    assert client.models.retrieve(HUB_ID).id == HUB_ID
    assert client.models.retrieve(PATH_ID).id == HUB_ID  # an alias names the same model
    with pytest.raises(openai.NotFoundError, match="the model 'mlx-community' does not exist"):
        client.models.retrieve("mlx-community")
    assert httpx.get(live.url + "/v1/models/").status_code == 404
    reply = client.chat.completions.create(model=PATH_ID, messages=HI, max_tokens=2)
    assert reply.model == HUB_ID


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"messages": HI, "tool_choice": "auto"}, "tool_choice",
     "tool_choice: given without tools; send tools, or leave tool_choice out"),
    ({"messages": HI, "tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
     "tool_choice: given without tools; send tools, or leave tool_choice out"),
    ({"messages": HI, "tools": WEATHER * 2}, "tools",
     "tools: more than one tool is named 'get_weather'; give each tool its own name"),
])
def test_openai_tool_refusals_name_their_parameter(live, body, param, message):
    response = post(live.url, body)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": HI, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                "schema": {"type": "foo"}}}},
     "response_format"),
])
def test_the_librarys_refusals_name_the_request_parameter(live, body, param):
    response = post(live.url, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_form_encoded_body_is_told_the_content_type(live):
    response = httpx.post(live.url + "/v1/chat/completions", content=json.dumps({"messages": HI}),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == ("the body must be JSON, sent with Content-Type: application/json "
                                                   "(it came as application/x-www-form-urlencoded)")


@pytest.mark.parametrize(("error", "path", "status", "param", "code", "message", "headers"), [
    (ContextLengthError("the prompt has 5000 tokens but the model's context is 4096; shorten it"),
     "/v1/chat/completions", 400, "messages", "context_length_exceeded",
     "the prompt has 5000 tokens but the model's context is 4096; shorten it", {}),
    (ContextLengthError("the prompt has 5000 tokens but the model's context is 4096; shorten it"),
     "/v1/completions", 400, "prompt", "context_length_exceeded",
     "the prompt has 5000 tokens but the model's context is 4096; shorten it", {}),
    (MemoryLimitError("this request needs 2.0 GB of KV cache, over the budget of 1.0 GB; lower max_tokens"),
     "/v1/chat/completions", 400, "max_tokens", "kv_memory_exceeded",
     "this request needs 2.0 GB of KV cache, over the budget of 1.0 GB; lower max_tokens (the KV budget is the "
     "server's --kv-memory)", {}),
    (EngineFull("256 requests are waiting already; try again later"), "/v1/chat/completions", 429, None,
     "queue_full", "256 requests are waiting already; try again later", {"retry-after": "1"}),
])
def test_library_refusals_get_openai_codes(error, path, status, param, code, message, headers):
    body = {"messages": HI} if path == "/v1/chat/completions" else {"prompt": "x"}
    with served(RefusingEngine(error), "m") as server:
        response = post(server.url, body, path)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param and response.json()["error"]["code"] == code
    assert response.json()["error"]["message"] == message
    assert {k: response.headers[k] for k in headers} == headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
def test_a_template_failure_names_no_server_path_nor_the_templates_internals(path):
    failed = Qwen3Error("/models/qwen3/tokenizer_config.json: chat template failed: UndefinedError: list object has "
                        "no element 0")
    body = {"messages": HI, "max_tokens": 2, "model": "m"} if path != "/v1/responses" else {"input": "x"}
    with served(RefusingEngine(failed), "m") as server:
        response = post(server.url, body, path)
    assert response.status_code == 400
    param = "input" if path == "/v1/responses" else "messages"
    message = (f"{param}: the model's chat template cannot render this conversation; check its messages' roles "
               "and order")
    assert message == (response.json()["error"]["message"])
    assert "/models" not in response.text and "UndefinedError" not in response.text


# ---------------------------------------------------------------- the reasoning sealed, the key, the log


def test_sealed_reasoning_opens_under_its_key_alone():
    key = b"k" * 32
    sealed = seal("Let me think. " * 50, key)
    assert sealed.startswith("q3m1.") and len(sealed) < len("Let me think. " * 50)  # compressed
    assert unseal(sealed, key) == "Let me think. " * 50
    assert unseal(sealed, b"another server's key") is None
    assert unseal(sealed[:10] + ("A" if sealed[10] != "A" else "B") + sealed[11:], key) is None
    for foreign in ("qwen3-mlx-0123abcd", "q3m1.!!!", "", None, "EqQBCkgIBxABGAIqQ"):
        assert unseal(foreign, key) is None


def test_the_key_is_created_once_in_the_users_cache_and_a_short_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = load_key()
    assert (tmp_path / "qwen3-mlx" / "secret-key").stat().st_mode & 0o777 == 0o600
    assert load_key() == key and len(key) == 64
    (tmp_path / "short").write_text("abc")
    with pytest.raises(Qwen3Error, match=r"--secret-key-file .*short: a key needs 16 bytes or more, got 3"):
        load_key(tmp_path / "short")


def test_serve_logs_a_left_out_tool_type_once_at_its_log_level(tiny_checkpoint, tmp_path):
    (tmp_path / "key").write_text("k" * 32)
    body = {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "web_search"}, {"type": "web_search"}]}
    for level, lines in (("info", 1), ("warning", 0)):
        with ServeProcess(tiny_checkpoint, "--log-level", level, "--secret-key-file", str(tmp_path / "key")) as server:
            for _ in range(2):
                assert httpx.post(server.url + "/v1/responses", json=body, timeout=60).status_code == 200
            server.proc.terminate()
            server.proc.wait(30)
        log = server.log()
        assert log.count("responses: a tool of type 'web_search' left out") == lines, log
        assert ("INFO" in log) == (level == "info")


# ---------------------------------------------------------------- reasoning_effort


@pytest.mark.parametrize(("effort", "budget"), [("none", 0), ("minimal", 256), ("low", 1024), ("medium", 4096),
                                                ("high", 16384), ("xhigh", 32768), ("max", None)])
def test_reasoning_effort_names_a_thinking_budget(effort, budget):
    assert thinking_budget(ChatCompletionRequest(messages=HI, reasoning_effort=effort), default=7) == budget


def test_the_sdks_newest_efforts_are_accepted(client):
    for effort in ("xhigh", "max"):
        reply = client.chat.completions.create(model=HUB_ID, messages=HI, max_tokens=2, reasoning_effort=effort)
        assert reply.object == "chat.completion"
