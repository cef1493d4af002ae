"""One request, one path: a Prompt and GenerationOptions give the same tokens through generate,
batch_generate and the Engine, whichever limit ends them, wherever forced text falls."""

import pytest
from stubs import ScriptedModel, replies

from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.generation.engine import Engine
from qwen3_mlx.generation.single import EARLY_STOP_TEXT, generate
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.text.prompt import Prompt, encode_prompt

GREEDY = dict(temp=0.0, top_k=0, top_p=1.0, min_p=0.0)


def reasoner(tok):
    """<think>, then " a" for ever; after </think>, "b" for ever (no end of turn: only limits end it)."""
    (a,), (b,) = tok.encode(" a"), tok.encode("b")

    def script(prompt, response):
        if not response and tok.think_start_id not in prompt[-3:]:
            return tok.think_start_id
        return b if tok.think_end_id in response else a

    return script


def three_paths(model, tok, prompt, opts):
    """The response's ids alone, as row 1 of a batch of 2, and through the engine."""
    alone = generate(model, tok, prompt, opts)
    batched = batch_generate(model, tok, [Prompt("a neighbour"), prompt], opts)[1]
    with Engine(model, tok, prefix_store_bytes=0) as engine:
        served = engine.submit(prompt, opts).result()
    return alone, batched, served


def early_stop_length(tok):
    return len(tok.encode(EARLY_STOP_TEXT))


@pytest.mark.parametrize("prefill", [None, "<think>\nhm"])
@pytest.mark.parametrize("limit", ["max_total_tokens", "context"])
def test_forced_text_that_reaches_a_cap_ends_the_response_in_every_path(tok, prefill, limit):
    model = ScriptedModel(reasoner(tok), header=tok.encode("<|im_start|>assistant\n"))
    prompt = Prompt("Why?", prefill_response=prefill)
    prompt_ids, _ = encode_prompt(tok, prompt)
    opened = prefill is not None  # the prompt opened the block: no <think> drawn
    end_of_forced = (0 if opened else 1) + 7 + early_stop_length(tok)
    for cap in range(end_of_forced - 2, end_of_forced + 3):
        opts = GenerationOptions(thinking_budget=7, max_tokens=50, **GREEDY)
        if limit == "max_total_tokens":
            opts = opts.replace(max_total_tokens=cap)
        else:
            model.args.max_position_embeddings = len(prompt_ids) + cap
        results = three_paths(model, tok, prompt, opts)
        assert [len(r.token_ids) for r in results] == [cap] * 3, cap
        assert results[0].token_ids == results[1].token_ids == results[2].token_ids
        assert {r.stats.finish_reason for r in results} == {"length"}
    model.args.max_position_embeddings = 4096


@pytest.mark.parametrize("budget", [0, 7])
def test_max_tokens_after_forced_text_is_kept_in_every_path(tok, budget):
    model = ScriptedModel(reasoner(tok), header=tok.encode("<|im_start|>assistant\n"))
    for answer in (1, 2, 3):
        opts = GenerationOptions(thinking_budget=budget, max_tokens=answer, **GREEDY)
        results = three_paths(model, tok, Prompt("Why?"), opts)
        assert results[0].token_ids == results[1].token_ids == results[2].token_ids
        assert [r.stats.answer_tokens for r in results] == [answer] * 3
        assert results[0].content == "b" * answer


def test_the_thinking_budget_is_a_hard_limit_and_a_cut_character_is_not_shown(tok):
    # " a", " a", then the first of the three tokens of 🫠: the budget of 3 cuts inside the character.
    (a,), smile = tok.encode(" a"), tok.encode("🫠")
    reasoning = [a, a, *smile, a]

    def script(prompt, response):
        if not response:
            return tok.think_start_id
        if tok.think_end_id in response:
            return tok.token_to_id("<|im_end|>")
        return reasoning[min(len(response) - 1, len(reasoning) - 1)]

    model = ScriptedModel(script, header=tok.encode("<|im_start|>assistant\n"))
    for budget in (3, 4, 5):
        results = three_paths(model, tok, Prompt("Why?"), GenerationOptions(thinking_budget=budget, **GREEDY))
        for r in results:
            assert r.stats.reasoning_tokens == budget
            assert r.token_ids[1 : 1 + budget] == reasoning[:budget]  # the tokens stay in the response
            assert "\ufffd" not in r.reasoning
        shown = " a a🫠" if budget == 5 else " a a"
        assert [r.reasoning for r in results] == [shown + EARLY_STOP_TEXT.split("</think>")[0].rstrip("\n")] * 3


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_a_tool_call_cut_by_the_cap_is_neither_a_call_nor_text(tok):
    answer = ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
              '<tool_call>\n{"name": "f", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    model = ScriptedModel(replies(tok, "", answer), header=tok.encode("<|im_start|>assistant\n"))
    prompt = Prompt("Call f twice.", tools=TOOLS)
    whole = generate(model, tok, prompt, think=False, **GREEDY)
    assert [c.arguments_json for c in whole.tool_calls] == ['{"a": 1}', '{"a": 2, "b": 3}']
    assert whole.stats.finish_reason == "tool_calls"
    first_call = len(tok.encode(answer.split("\n<tool_call>")[0]))
    cut = first_call + 8  # inside the second call's arguments
    results = three_paths(model, tok, prompt, GenerationOptions(think=False, max_tokens=cut, **GREEDY))
    for r in results:
        assert r.stats.finish_reason == "length"
        assert [c.arguments_json for c in r.tool_calls] == ['{"a": 1}']
        assert "<tool_call>" not in r.content and r.content == ""


def test_the_keyword_api_is_a_prompt_value(tok):
    model = ScriptedModel(replies(tok, "", "yes"), header=tok.encode("<|im_start|>assistant\n"))
    by_keywords = generate(model, tok, "Sure?", system="Be brief.", tools=TOOLS, think=False)
    by_value = generate(model, tok, Prompt("Sure?", system="Be brief.", tools=TOOLS), think=False)
    assert by_keywords.token_ids == by_value.token_ids and by_value.content == "yes"
    assert by_keywords.stats.prompt_tokens == by_value.stats.prompt_tokens
    assert Prompt.of(Prompt("q", system="s"), raw=False, tools=None) == Prompt("q", system="s")
