"""The chat template: exact parity with transformers on the real Qwen3 template, the sandbox, and template errors."""

import json
from pathlib import Path

import jinja2
import pytest
import tokenizers
from tokenizers.models import WordLevel

from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(qwen_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — °C, über-precise",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}


def _call(name: str, arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


USER = [{"role": "user", "content": "What is 2+2?"}]
SYSTEM = [{"role": "system", "content": "You are terse."}, *USER]
REASONED_HISTORY = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]
TOOL_ROUND = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        _call("get_weather", {"city": "Paris", "days": 1}),
        _call("get_time", '{"city": "Paris"}'),
    ]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "content": "14:05"},
]

# (messages, tools, add_generation_prompt, enable_thinking)
CASES = {
    "single_user": (USER, None, True, True),
    "system_prompt": (SYSTEM, None, True, True),
    "history_reasoning_dropped": (REASONED_HISTORY, None, True, True),
    "last_assistant_keeps_reasoning": (
        [*REASONED_HISTORY, {"role": "assistant", "content": "<think>\nDouble 3.\n</think>\n\n6"}], None, False, True),
    "reasoning_content_field": (
        [*USER, {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4."}], None, False, True),
    "reasoning_field_alias": (
        [*USER, {"role": "assistant", "content": "4", "reasoning": "Two twos."}], None, False, True),
    "tools_offered": (SYSTEM, [WEATHER, TIME], True, True),
    "tool_calls_and_responses": (TOOL_ROUND, [WEATHER, TIME], True, True),
    "tool_call_with_text_and_answer": (
        [*TOOL_ROUND[1:3], TOOL_ROUND[3],
         {"role": "assistant", "content": "Checking.", "tool_calls": [_call("get_weather", {"city": "Nice"})]},
         {"role": "tool", "content": "rain"},
         {"role": "assistant", "content": "<think>\nSummarise.\n</think>\n\nSunny in Paris, rain in Nice."},
         {"role": "user", "content": "Thanks"}], [WEATHER], True, True),
    "thinking_disabled": (SYSTEM, None, True, False),
    "soft_switch_no_think": ([{"role": "user", "content": "Quick: capital of France? /no_think"}], None, True, True),
    "soft_switch_think": ([{"role": "user", "content": "Prove it. /think"}], None, True, True),
    "no_generation_prompt": ([*SYSTEM, {"role": "assistant", "content": "4"}], None, False, True),
    "unicode": ([{"role": "system", "content": "Réponds en français 🇫🇷"},
                 {"role": "user", "content": "你好！こんにちは 👨‍👩‍👧 مرحبا\n\ttab"}], None, True, False),
    "content_none_dropped": (
        [*USER, {"role": "assistant", "content": "", "tool_calls": [_call("get_time", {})], "reasoning": None},
         {"role": "tool", "content": "09:00"}], [TIME], True, True),
}


@pytest.mark.parametrize("name", CASES)
def test_template_matches_transformers(tok, hf, name):
    messages, tools, add_generation_prompt, enable_thinking = CASES[name]
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    got = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking)
    assert got == expected


def test_single_user_prompt_is_exact(tok):
    assert tok.apply_chat_template(USER) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_disabled_adds_an_empty_think_block(tok):
    assert tok.apply_chat_template(USER, enable_thinking=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tool_schema_is_dumped_like_transformers_tojson(tok):
    # ensure_ascii=False and keys in insertion order, unlike Jinja's own tojson.
    assert json.dumps(WEATHER, ensure_ascii=False) in tok.apply_chat_template(USER, tools=[WEATHER])


# ---------------------------------------------------------------- OpenAI-style content parts, malformed messages


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


PARTS_CASES = {
    "user_two_parts": [{"role": "user", "content": _parts("What is", "2+2?")}],
    "every_role": [{"role": "system", "content": _parts("Be terse.")}, {"role": "user", "content": _parts("Hi")},
                   {"role": "assistant", "content": _parts("<think>\nGreet.\n</think>\n\n", "Hello.")},
                   {"role": "user", "content": _parts("Time?", "", "Paris.")},
                   {"role": "assistant", "content": None, "tool_calls": [_call("get_time", {})]},
                   {"role": "tool", "content": _parts("14:05")}],
    "empty_list": [{"role": "user", "content": []}],
}


def _joined(messages: list[dict]) -> list[dict]:
    """What vLLM hands a string-content template such as Qwen3's: text parts joined with newlines, and the
    null content beside tool calls as empty text."""
    out = []
    for m in messages:
        content = m["content"]
        out.append({**m, "content": "" if content is None else "\n".join(p["text"] for p in content)})
    return out


@pytest.mark.parametrize("name", PARTS_CASES)
def test_text_parts_render_as_transformers_renders_their_joined_text(tok, hf, name):
    # transformers hands lists to the template as they are: Qwen3's first template fails on them, its later one
    # (`content is string` else '') drops their text. vLLM joins the parts with newlines for such templates, as we do.
    messages = PARTS_CASES[name]
    expected = hf.apply_chat_template(_joined(messages), tools=[TIME], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tools=[TIME]) == expected


def test_text_parts_are_joined_with_newlines(tok):
    assert tok.apply_chat_template([{"role": "user", "content": _parts("a", "b")}]) == (
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, message", [
    ([{"content": "hi"}], "messages[0] has no 'role'; give it one of system, user, assistant, tool"),
    ([*USER, {"role": "developer", "content": "x"}],
     "messages[1].role='developer' is not one of system, user, assistant, tool"),
    ([{"role": ["user"], "content": "x"}], "messages[0].role=['user'] is not one of system, user, assistant, tool"),
    ([{"role": "user", "content": 7}],
     'messages[0].content=7 must be text or a list of {"type": "text", "text": ...} parts'),
    ([{"role": "user"}], "messages[0] (user) has no 'content'; give it text"),
    ([{"role": "assistant", "content": None}], "messages[0] (assistant) has no 'content'; give it text"),
    ([{"role": "user", "content": [*_parts("look"), {"type": "image_url", "image_url": {"url": "x.png"}}]}],
     "messages[0].content[1] is type 'image_url'; Qwen3 reads text parts only: {\"type\": \"text\", \"text\": \"...\"}"),
    ([{"role": "user", "content": ["plain"]}],
     "messages[0].content[0] is a str; Qwen3 reads text parts only: {\"type\": \"text\", \"text\": \"...\"}"),
    ([{"role": "user", "content": [{"text": "no type"}]}],
     "messages[0].content[0] is type None; Qwen3 reads text parts only: {\"type\": \"text\", \"text\": \"...\"}"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text=3 must be a string"),
    ([USER[0], "hi"], 'messages[1] is a str; give an object like {"role": "user", "content": "..."}'),
    ("hi", 'messages is a str; give a list of {"role": ..., "content": ...} objects'),
])
def test_a_malformed_message_is_one_option_error_naming_it(tok, messages, message):
    with pytest.raises(OptionError) as e:
        tok.apply_chat_template(messages)
    assert str(e.value) == message


def test_caller_messages_are_not_modified(tok):
    messages = [*USER, {"role": "assistant", "content": "4", "reasoning": "Two twos."}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


# ---------------------------------------------------------------- templates from files, and their errors


def _checkpoint(path: Path, *, template_file: str | None = None, config_template=None) -> Path:
    tokenizers.Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    if config_template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": config_template}))
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file)
    return path


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    tok = Tokenizer.from_dir(_checkpoint(tmp_path, template_file="file", config_template="config"))
    assert tok.chat_template == "file"
    assert tok.apply_chat_template(USER) == "file"


def test_template_list_takes_the_default_entry(tmp_path):
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages|length }}"}]
    tok = Tokenizer.from_dir(_checkpoint(tmp_path, config_template=templates))
    assert tok.apply_chat_template(USER) == "1"


def test_template_list_without_default_is_an_error(tmp_path):
    _checkpoint(tmp_path, config_template=[{"name": "tool_use", "template": "tools"}])
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == (f"{tmp_path}/tokenizer_config.json: chat_template must be a string or a list of "
                            "{name, template} with a 'default' entry; fix it or add a chat_template.jinja")


def test_template_sees_special_tokens_and_extra_variables(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<pad>", "bos_token": None,
         "chat_template": "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ enable_thinking }}|{{ x }}"}))
    tok = Tokenizer.from_dir(_checkpoint(tmp_path))
    assert tok.apply_chat_template(USER, enable_thinking=False, x=[1, "é"]) == "<|im_end|>|<pad>|False|False|[1, 'é']"


def test_template_globals_match_transformers(tmp_path):
    template = ("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
                "|{{ {'b': 1, 'a': 'ü'} | tojson }}|{{ [1] | tojson(indent=1) }}|{{ dict(k=1) }}"
                "|{{ strftime_now('%Y') | length }}")
    tok = Tokenizer.from_dir(_checkpoint(tmp_path, template_file=template))
    assert tok.apply_chat_template(USER) == '012|{"b": 1, "a": "ü"}|[\n 1\n]|{\'k\': 1}|4'


# The sandbox's refusals are our words: template._Sandbox and _TemplateNamespace write them.


def test_sandbox_refuses_reaching_python_internals(tmp_path):
    _checkpoint(tmp_path, template_file="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == (f"{tmp_path}/chat_template.jinja: chat template refused by the sandbox: access to "
                            "attribute '__class__' of 'str' object is unsafe.")


def test_sandbox_refuses_function_globals(tmp_path):
    _checkpoint(tmp_path, config_template="{{ cycler.__init__.__globals__ }}")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == (f"{tmp_path}/tokenizer_config.json: chat template refused by the sandbox: access to "
                            "attribute '__init__' of 'type' object is unsafe.")


def test_sandbox_refuses_underscore_namespace_attributes(tmp_path):
    _checkpoint(tmp_path, template_file="{% set ns = namespace(__class__=1) %}")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == (f"{tmp_path}/chat_template.jinja: chat template refused by the sandbox: namespace "
                            "attribute '__class__' starts with an underscore")


def test_template_syntax_error_names_the_file_and_line(tmp_path):
    template = "line one\n{% for %}"
    _checkpoint(tmp_path, template_file=template)
    with pytest.raises(jinja2.TemplateSyntaxError) as reason:  # jinja's words for it, which the message carries
        jinja2.Environment().from_string(template)
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == f"{tmp_path}/chat_template.jinja: chat template syntax error at line 2: {reason.value}"


def test_raise_exception_in_template_becomes_one_line_error(tmp_path):
    _checkpoint(tmp_path, template_file="{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}")
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == (f"{tmp_path}/chat_template.jinja: the chat template rejected the conversation: "
                            "Conversation roles must alternate user/assistant")


def test_template_failing_names_the_file_and_the_error(tmp_path):
    _checkpoint(tmp_path, template_file="{{ messages[0].content.startswith() }}")
    with pytest.raises(TypeError) as reason:  # Python's words for it, which the message carries
        USER[0]["content"].startswith()
    with pytest.raises(Qwen3Error) as e:
        Tokenizer.from_dir(tmp_path).apply_chat_template(USER)
    assert str(e.value) == f"{tmp_path}/chat_template.jinja: chat template failed: TypeError: {reason.value}"


def test_no_template_suggests_raw_mode(tmp_path):
    tok = Tokenizer.from_dir(_checkpoint(tmp_path))
    assert tok.chat_template is None
    with pytest.raises(Qwen3Error) as e:
        tok.apply_chat_template(USER)
    assert str(e.value) == (f"{tmp_path}: the checkpoint has no chat template (no chat_template.jinja and no "
                            "chat_template in tokenizer_config.json); use --raw to send the prompt as-is")
