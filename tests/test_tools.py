"""Qwen3 tool calls parsed out of the answer, whole and streamed, and through generation."""

import itertools
import json
import random

import pytest
from stubs import ScriptedModel

from qwen3_mlx.generation.single import generate, stream_generate
from qwen3_mlx.text.tools import (
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    parse_tool_calls,
    tool_call_openai,
)

# Text before and between the blocks, the template's newlines around them, an object's arguments with
# escapes and braces inside a string, and arguments given as a JSON string.
ANSWER = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich \\"old\\" {town}", '
          '"days": [1, 2]}}\n</tool_call>\nThen the time.\n<tool_call>\n{"name": "get_time", "arguments": '
          '"{\\"zone\\": \\"CET\\"}"}\n</tool_call>\n')
CONTENT = "I will look both up.\nThen the time."
CALLS = [ToolCall("call_0", "get_weather", {"city": 'Zürich "old" {town}', "days": [1, 2]}),
         ToolCall("call_1", "get_time", {"zone": "CET"})]
# Their arguments' text, as it streams and as OpenAI's `arguments` carries it.
CALLS_JSON = ['{"city": "Zürich \\"old\\" {town}", "days": [1, 2]}', '{"zone": "CET"}']


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def streamed(pieces):
    parser = ToolCallParser(ids())
    events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
    return parser, events


def split(text, size):
    return [text[i : i + size] for i in range(0, len(text), size)]


def text_of(events):
    return "".join(e for e in events if isinstance(e, str))


def arguments_of(events, index):
    return "".join(e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == index)


# ---------------------------------------------------------------- whole answers


def test_one_call_whole():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    assert parse_tool_calls(text, ids()) == ("", [ToolCall("call_0", "get_time", {"zone": "CET"})])


def test_several_calls_with_text_before_and_between():
    assert parse_tool_calls(ANSWER, ids()) == (CONTENT, CALLS)


def test_a_call_carries_its_arguments_as_an_object_and_as_the_json_text_it_streams():
    _, calls = parse_tool_calls(ANSWER, ids())
    assert [c.arguments for c in calls] == [{"city": 'Zürich "old" {town}', "days": [1, 2]}, {"zone": "CET"}]
    assert [c.arguments_json for c in calls] == CALLS_JSON


def test_the_openai_form_of_a_call():
    assert tool_call_openai(CALLS[1]) == {"id": "call_1", "type": "function",
                                          "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}


def test_ids_are_call_and_24_hex_digits():
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29 and int(calls[0].id[5:], 16) >= 0


def test_arguments_are_written_as_json_dumps_writes_them():
    # No spaces, a trailing zero, an exponent, escaped unicode with a surrogate pair, an escaped slash.
    text = '<tool_call>{"name":"f","arguments":{"a":1.50,"b":"\\u00fc\\ud83d\\ude00\\/","c":1E2,"d":[true,null]}}</tool_call>'
    arguments = '{"a": 1.5, "b": "ü😀/", "c": 100.0, "d": [true, null]}'
    call = ToolCall("call_0", "f", {"a": 1.5, "b": "ü😀/", "c": 100.0, "d": [True, None]})
    assert (parse_tool_calls(text, ids()), call.arguments_json) == (("", [call]), arguments)
    for size in range(1, len(text) + 1):
        parser, events = streamed(split(text, size))
        assert (parser.calls, arguments_of(events, 0)) == ([call], arguments)


def test_unicode_arguments_stay_unescaped():
    text = '<tool_call>{"name": "translate", "arguments": {"text": "日本語 — ça va? 🙂", "to": "Ελληνικά"}}</tool_call>'
    arguments = '{"text": "日本語 — ça va? 🙂", "to": "Ελληνικά"}'
    call = ToolCall("call_0", "translate", {"text": "日本語 — ça va? 🙂", "to": "Ελληνικά"})
    assert (parse_tool_calls(text, ids()), call.arguments_json) == (("", [call]), arguments)
    parser, events = streamed(list(text))
    assert arguments_of(events, 0) == arguments and parser.calls == [call]


# ---------------------------------------------------------------- streamed


@pytest.mark.parametrize("size", range(1, len(ANSWER) + 1))
def test_streamed_in_pieces_of_any_size_it_gives_what_the_whole_answer_gives(size):
    parser, events = streamed(split(ANSWER, size))
    assert parser.calls == CALLS and parser.abandoned == []
    assert text_of(events) == CONTENT
    firsts = [(d.index, d.id, d.name) for d in events if isinstance(d, ToolCallDelta) and d.id is not None]
    assert firsts == [(0, "call_0", "get_weather"), (1, "call_1", "get_time")]
    assert [arguments_of(events, i) for i in (0, 1)] == CALLS_JSON


def test_char_by_char_the_call_is_announced_then_its_arguments_stream_token_by_token():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": [1, "x\\ny"], "b": true}}\n</tool_call>'
    _, events = streamed(list(text))
    assert events == ["S", "u", "r", "e", ".", ToolCallDelta(0, "call_0", "f", "")] + [
        ToolCallDelta(0, None, None, piece)
        for piece in ["{", '"', "a", '"', ": ", "[", "1, ", '"', "x", "\\n", "y", '"', "]", ", ", '"', "b", '"', ": ",
                      "true", "}"]]


def test_arguments_given_as_a_string_come_whole_at_the_end_of_the_block():
    text = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
    _, events = streamed(list(text))
    assert events == [ToolCallDelta(0, "call_0", "get_time", '{"zone": "CET"}')]


def test_token_by_token_as_the_detokenizer_releases_it(tok):
    detok = tok.detokenizer()
    token_ids = tok.encode(ANSWER)
    assert tok.token_to_id("<tool_call>") in token_ids and tok.token_to_id("</tool_call>") in token_ids
    pieces = [detok.add(t) for t in token_ids] + [detok.flush()]
    parser, events = streamed(pieces)
    assert (parser.calls, text_of(events)) == (CALLS, CONTENT)
    assert [arguments_of(events, i) for i in (0, 1)] == CALLS_JSON


def test_random_arguments_in_random_pieces_stream_exactly_as_json_dumps_writes_them():
    rng = random.Random(0)
    leaves = [0, -7, 3.25, 1e-9, 12345678901234567890, True, False, None, "", "a\"b\\c\n\t\u0001/", "é🙂<tool", "}]{["]

    def value(depth):
        kind = rng.randrange(4 if depth < 3 else 1)
        if kind == 1:
            return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}
        if kind == 2:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return rng.choice(leaves)

    for _ in range(200):
        arguments = {f"k{i}": value(1) for i in range(rng.randrange(1, 4))}
        raw = json.dumps(arguments, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        text = f'<tool_call>\n{{"name": "f", "arguments": {raw}}}\n</tool_call>'
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 40))))
        parser, events = streamed([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
        expected = json.dumps(arguments, ensure_ascii=False)
        assert (parser.calls, arguments_of(events, 0), text_of(events)) == ([ToolCall("call_0", "f", arguments)],
                                                                            expected, "")
        assert parser.calls[0].arguments_json == expected


# ---------------------------------------------------------------- blocks that are not calls


@pytest.mark.parametrize("block, abandoned", [
    ('{"name": "f", "arguments": {"a": 1,}}', [0]),  # announced, then the JSON broke
    ('{"name": "f", "arguments": {"a": 1, "a": 2}}', [0]),  # a repeated key: the streamed text is not json.dumps's
    ('{"name": "f", "arguments": {"a": 1}, "name": "g"}', [0]),  # the name announced is not the call's
    ('{"arguments": {}}', []),
    ('{"name": "f", "arguments": [1]}', []),
    ('{"name": "f", "arguments": "[1]"}', []),
    ("not json", []),
])
def test_a_block_that_is_not_a_call_is_left_as_text_whole_and_streamed(block, abandoned):
    text = f'Before <tool_call>{block}</tool_call> after\n<tool_call>{{"name": "g", "arguments": {{}}}}</tool_call>'
    content = f"Before <tool_call>{block}</tool_call> after"
    assert parse_tool_calls(text, ids()) == (content, [ToolCall(f"call_{len(abandoned)}", "g", {})])
    for size in (1, 2, 7, len(text)):
        parser, events = streamed(split(text, size))
        assert (text_of(events), parser.calls, parser.abandoned) == (
            content, [ToolCall(f"call_{len(abandoned)}", "g", {})], abandoned)
        # The block comes back whole, as one piece of text at its end.
        assert f" <tool_call>{block}</tool_call>" in events
        # The next call takes the next index, after the abandoned one's.
        assert {e.index for e in events if isinstance(e, ToolCallDelta) and e.name == "g"} == {len(abandoned)}


def test_an_abandoned_call_streamed_only_its_valid_prefix():
    _, events = streamed(list('<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>'))
    assert events == [ToolCallDelta(0, "call_0", "f", "")] + [
        ToolCallDelta(0, None, None, piece) for piece in ["{", '"', "a", '"', ": ", "1, "]] + [
        '<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>']


def test_a_value_the_stream_does_not_write_comes_at_the_end_of_the_block():
    # json reads NaN, so the block is a call; the stream stops before it and the end sends the rest.
    _, events = streamed(list('<tool_call>{"name": "f", "arguments": {"a": NaN, "b": 1}}</tool_call>'))
    assert [e.arguments for e in events] == ["", "{", '"', "a", '"', ": ", 'NaN, "b": 1}']


def test_an_unterminated_block_at_the_end_is_text():
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": '
    assert parse_tool_calls(text, ids()) == ('Hi <tool_call>{"name": "f", "arguments": {"a":', [])
    parser, events = streamed(list(text))
    assert (text_of(events), parser.calls, parser.abandoned) == (
        'Hi <tool_call>{"name": "f", "arguments": {"a":', [], [0])


def test_text_that_only_looks_like_a_tag_is_released_intact():
    parser, events = streamed(["a <tool", "s> b < c <tool_cal", "l_x> d </tool_call> <tool_c"])
    # Each piece's text is released as far as it cannot begin <tool_call>; the rest waits for the next.
    assert events == ["a", " <tools> b < c", " <tool_call_x> d </tool_call>", " <tool_c"]
    assert parser.calls == []
    assert parse_tool_calls("x <tool_call_x>", ids()) == ("x <tool_call_x>", [])


def test_whitespace_is_released_only_between_texts():
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parse_tool_calls(f"\n\n{call}\n\nAfter.\n", ids())[0] == "After."
    assert parse_tool_calls(f"  One.  \n{call} {call}\n Two.  ", ids())[0] == "One.\n Two."
    _, events = streamed(list("  A b \n"))
    assert events == ["A", " b"]


# ---------------------------------------------------------------- through generation


def test_generate_parses_the_calls_and_streams_them_as_chunks(tok):
    script_ids = tok.encode(ANSWER) + [tok.token_to_id("<|im_end|>")]
    header = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # think=False: the block is closed

    def model():
        return ScriptedModel(lambda prompt, response: script_ids[min(len(response), len(script_ids) - 1)], header=header)

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chunks = list(stream_generate(model(), tok, "weather?", think=False, tools=tools))
    assert {c.kind for c in chunks} == {"answer", "tool_call"}
    result = generate(model(), tok, "weather?", think=False, tools=tools)
    assert result.content == CONTENT
    assert [(c.name, c.arguments, c.arguments_json) for c in result.tool_calls] == [
        (c.name, c.arguments, c.arguments_json) for c in CALLS]
    assert result.tool_calls[0].id.startswith("call_") and len(result.tool_calls[0].id) == 29
    assert result.stats.finish_reason == "tool_calls"
    # Without tools, the same answer is text.
    plain = generate(model(), tok, "weather?", think=False)
    assert (plain.content, plain.tool_calls, plain.stats.finish_reason) == (ANSWER, [], "stop")


def test_a_call_announced_then_found_malformed_is_not_in_the_result(tok):
    answer = '<tool_call>\n{"name": "f", "arguments": {"a": 1}, }\n</tool_call>'  # a trailing comma, after streaming
    script_ids = tok.encode(answer) + [tok.token_to_id("<|im_end|>")]
    header = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    model = ScriptedModel(lambda prompt, response: script_ids[min(len(response), len(script_ids) - 1)], header=header)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chunks = list(stream_generate(model, tok, "q", think=False, tools=tools))
    assert [c.tool_call.name for c in chunks if c.tool_call and c.tool_call.id] == ["f"]  # it was announced
    stats = chunks[-1].stats
    assert (stats.tool_calls, stats.finish_reason) == ([], "stop")
    assert "".join(c.text for c in chunks if c.kind == "answer") == answer
