"""Qwen3 tool calls parsed out of the answer, whole and streamed, and through generation."""

import itertools

import pytest
from stubs import ScriptedModel

from qwen3_mlx.generation import generate, stream_generate
from qwen3_mlx.tools import ToolCall, ToolCallDelta, ToolCallParser, parse_tool_calls, tool_call_openai

ANSWER = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich \\"old\\" {town}", '
          '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n'
          '</tool_call>')
CALLS = [ToolCall("call_0", "get_weather", '{"city": "Zürich \\"old\\" {town}", "days": [1, 2]}'),
         ToolCall("call_1", "get_time", '{"zone": "CET"}')]


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def streamed(pieces):
    parser = ToolCallParser(ids())
    events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
    return parser, events


def test_a_whole_answer_gives_its_text_and_calls():
    assert parse_tool_calls(ANSWER, ids()) == ("I will look both up.", CALLS)
    assert tool_call_openai(CALLS[1]) == {"id": "call_1", "type": "function",
                                          "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 1000])
def test_streamed_in_pieces_of_any_size_it_gives_what_the_whole_answer_gives(size):
    parser, events = streamed([ANSWER[i : i + size] for i in range(0, len(ANSWER), size)])
    assert parser.calls == CALLS
    assert "".join(e for e in events if isinstance(e, str)) == "I will look both up."
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.index, d.id, d.name) for d in firsts] == [(0, "call_0", "get_weather"), (1, "call_1", "get_time")]
    for index, call in enumerate(CALLS):
        assert "".join(d.arguments for d in deltas if d.index == index) == call.arguments
    if size == 1:  # an object's arguments stream as they come; a string's come whole at the end
        assert sum(1 for d in deltas if d.index == 0 and d.arguments) > 10
        assert [d.arguments for d in deltas if d.index == 1 and d.arguments] == ['{"zone": "CET"}']


def test_token_by_token_as_the_detokenizer_releases_it(tok):
    detok = tok.detokenizer()
    pieces = [detok.add(t) for t in tok.encode(ANSWER)] + [detok.flush()]
    parser, _ = streamed(pieces)
    assert parser.calls == CALLS


@pytest.mark.parametrize("block", ['{"name": "f", "arguments": {"a": 1,}}', '{"arguments": {}}',
                                   '{"name": "f", "arguments": [1]}', 'not json'])
def test_a_block_that_is_not_a_call_is_left_as_text(block):
    text = f"Before <tool_call>{block}</tool_call>"
    assert parse_tool_calls(text) == (f"Before<tool_call>{block}</tool_call>", [])
    parser, events = streamed(list(text))
    assert parser.calls == [] and f"<tool_call>{block}</tool_call>" in "".join(e for e in events if isinstance(e, str))


def test_an_unterminated_block_at_the_end_is_text():
    text = 'Hi <tool_call>{"name": "f", "argu'
    assert parse_tool_calls(text) == ('Hi<tool_call>{"name": "f", "argu', [])


def test_text_that_only_looks_like_a_tag_is_released_intact():
    parser, events = streamed(["a <tool", "s> b < c <tool_cal", "l_x>"])
    assert "".join(events) == "a <tools> b < c <tool_call_x>" and parser.calls == []


# ---------------------------------------------------------------- through generation


def test_generate_parses_the_calls_and_streams_them_as_chunks(tok):
    script_ids = tok.encode(ANSWER) + [tok.token_to_id("<|im_end|>")]
    header = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # think=False: the block is closed

    def model():
        return ScriptedModel(lambda response: script_ids[min(len(response), len(script_ids) - 1)], header=header)

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chunks = list(stream_generate(model(), tok, "weather?", think=False, tools=tools))
    kinds = {c.kind for c in chunks}
    assert kinds == {"answer", "tool_call"}
    result = generate(model(), tok, "weather?", think=False, tools=tools)
    assert result.content == "I will look both up."
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in CALLS]
    assert result.tool_calls[0].id.startswith("call_") and len(result.tool_calls[0].id) == 29
    assert result.stats.finish_reason == "tool_calls"
    # Without tools, the same answer is text.
    plain = generate(model(), tok, "weather?", think=False)
    assert (plain.content, plain.tool_calls, plain.stats.finish_reason) == (ANSWER, [], "stop")
