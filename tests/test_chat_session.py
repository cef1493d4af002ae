"""ChatSession at the edges: tools and tool results, interrupted turns, files that cannot be written,
what a rotating cache saves, and figures that belong to the conversation shown."""

import itertools
import os

import pytest
from checkpoints import tokenizer_dir

from qwen3_mlx.generation.chat import ChatSession
from qwen3_mlx.errors import OptionError, Qwen3Error

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def reference(hf, messages, **kwargs):
    return hf.encode(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs),
                     add_special_tokens=False)


def test_tools_reach_the_template_every_turn(tiny, hf):
    model, tok = tiny
    session = ChatSession(model, tok, tools=TOOLS, think=False, max_tokens=3, temp=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    assert session.render(messages) == reference(hf, messages, tools=TOOLS, enable_thinking=False)
    assert "get_weather" in tok.decode(session.render(messages))


def test_a_tool_result_is_answered_with_the_tool_turn_in_the_prompt(tiny, hf):
    model, tok = tiny
    session = ChatSession(model, tok, tools=TOOLS, think=False, max_tokens=3, temp=0)
    list(session.send("Weather in Paris?"))
    session.add_tool_result('{"temp": 21}', name="get_weather")
    list(session.respond())
    expected = reference(hf, session.messages[:-1], tools=TOOLS, enable_thinking=False)
    assert session.cached[: len(expected)] == expected
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in tok.decode(expected)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]


def test_respond_without_a_tool_result_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(OptionError) as e:
        ChatSession(model, tok).respond()
    assert str(e.value) == "respond() answers tool results: add_tool_result() first, or send() a message"


def test_an_interrupted_answer_stays_in_the_history_marked(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=20, temp=0, eager=False)
    chunks = session.send("Tell me a story")
    partial = "".join(c.text for c in itertools.islice(chunks, 4) if c.kind == "answer")
    chunks.close()  # what the CLI does on Ctrl-C
    assert session.messages == [{"role": "user", "content": "Tell me a story"},
                                {"role": "assistant", "content": partial, "interrupted": True}]
    assert session.last is not None and session.last.finish_reason == "interrupted"
    assert session.cache[0].offset == len(session.cached)
    list(session.send("Go on"))  # the next turn reuses what the cache holds
    assert session.last.cached_tokens > 0 and len(session.messages) == 4


def test_saving_into_a_missing_folder_is_one_line_and_nothing_is_written(tiny, tmp_path):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=2, temp=0)
    list(session.send("hi"))
    target = tmp_path / "no" / "such" / "f.safetensors"
    with pytest.raises(Qwen3Error) as e:
        session.save(target)
    assert str(e.value) == f"{target}: the folder {target.parent} does not exist; create it or choose another path"
    assert os.listdir(tmp_path) == []
    assert len(session.messages) == 2  # the conversation goes on


def test_a_rotated_cache_reports_what_it_saves(tiny, tmp_path):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=30, temp=0, max_kv_size=24,
                          logit_bias={t: -1e9 for t in tok.eos_token_ids})
    list(session.send("hi"))
    saved = session.save(tmp_path / "c.safetensors")
    assert saved.tokens == len(session.cached) > 24 and saved.held == 24


@pytest.mark.parametrize("how", ["reset", "load"])
def test_the_last_figures_belong_to_the_conversation_shown(tiny, tmp_path, how):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=2, temp=0)
    list(session.send("hi"))
    session.save(tmp_path / "c.safetensors")
    list(session.send("again"))
    assert session.last is not None
    session.reset() if how == "reset" else session.load(tmp_path / "c.safetensors")
    assert session.last is None


def test_set_budget_changes_the_options_of_the_next_turns(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, max_tokens=4)
    session.set_budget(0)
    list(session.send("hi"))
    assert session.options.thinking_budget == 0 and session.last.reasoning_tokens == 0
    session.set_budget(None)
    assert session.options.thinking_budget is None and session.options.max_tokens == 4
