"""Generation: thinking budget, stop rules, limits and seeds, on a scripted stub and a tiny random model."""

import dataclasses
import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from stubs import ScriptedModel, thinker

from qwen3_mlx import GenerationOptions
from qwen3_mlx.errors import OptionError
from qwen3_mlx.generation.single import EARLY_STOP_TEXT, ThinkingBudget, generate, stream_generate


def stub(tok, script):
    return ScriptedModel(script, header=tok.encode("<|im_start|>assistant\n"))


def run(tok, script, **options):
    model = stub(tok, script)
    return model, generate(model, tok, "question", **options)


def test_budget_cuts_reasoning_at_n_tokens_then_the_model_answers(tok):
    word, answer = tok.encode(" word"), tok.encode("The answer is 4.")
    model, r = run(tok, thinker(tok, word, answer), thinking_budget=40)
    assert r.stats.reasoning_tokens == 40
    assert r.stats.budget_exhausted
    assert r.reasoning == " word" * 40 + EARLY_STOP_TEXT.split("</think>")[0].rstrip("\n")
    assert r.content == "The answer is 4."
    assert r.stats.answer_tokens == len(answer)
    assert r.stats.forced_tokens == len(tok.encode(EARLY_STOP_TEXT))
    # What the model read: <think>, 40 reasoning tokens, the early-stop text with </think>, the answer.
    response = model.response()
    assert response == [tok.think_start_id] + word * 40 + tok.encode(EARLY_STOP_TEXT) + answer + [
        tok.token_to_id("<|im_end|>")]
    assert r.stats.finish_reason == "stop"


def test_budget_prefers_a_sentence_end_inside_the_grace_window(tok):
    pattern = tok.encode(" a b c d.")  # a sentence end every 5 tokens
    assert len(pattern) == 5
    _, r = run(tok, thinker(tok, pattern, tok.encode("ok")), thinking_budget=42)
    # The window opens at 42 - min(32, 42 // 4) = 32 tokens; the first sentence end there is at 35.
    assert r.stats.reasoning_tokens == 35
    assert r.reasoning.startswith(" a b c d." * 7 + "\n\nConsidering the limited time")


def test_a_budget_cut_inside_a_multibyte_character_drops_its_bytes_from_the_text(tok):
    clef = tok.encode("𝄞")  # two tokens, neither a character on its own
    assert len(clef) == 2
    model, r = run(tok, thinker(tok, clef, tok.encode("ok")), thinking_budget=41)
    assert r.stats.reasoning_tokens == 41  # a hard limit: the 41st token began a character, and the cut came
    assert r.reasoning == "𝄞" * 20 + EARLY_STOP_TEXT.split("</think>")[0].rstrip("\n")
    assert model.response()[:43] == [tok.think_start_id] + clef * 20 + clef[:1] + tok.encode(EARLY_STOP_TEXT)[:1]


def test_a_budget_over_bytes_that_never_make_a_character_shows_none_of_them(tok):
    lead = tok.encode("𝄞")[:1]  # the first bytes of a character, repeated: never a whole character
    _, r = run(tok, thinker(tok, lead, tok.encode("ok")), thinking_budget=10)
    assert r.stats.reasoning_tokens == 10
    assert r.reasoning == EARLY_STOP_TEXT.split("</think>")[0].strip("\n") and r.content == "ok"


def test_budget_larger_than_the_reasoning_changes_nothing(tok):
    script = thinker(tok, tok.encode(" step."), tok.encode("Done."), reasoning_len=10)
    _, with_budget = run(tok, script, thinking_budget=100, seed=1)
    _, without = run(tok, script, seed=1)
    assert with_budget.stats.reasoning_tokens == without.stats.reasoning_tokens == 10
    assert not with_budget.stats.budget_exhausted and with_budget.stats.forced_tokens == 0
    assert (with_budget.reasoning, with_budget.content) == (without.reasoning, without.content) == (
        " step." * 5, "Done.")


def test_budget_zero_closes_the_block_at_once_like_the_non_thinking_template(tok):
    model, r = run(tok, thinker(tok, tok.encode(" hmm"), tok.encode("Hi.")), thinking_budget=0)
    assert (r.reasoning, r.content, r.stats.reasoning_tokens) == ("", "Hi.", 0)
    empty_block = tok.encode("<think>\n\n</think>\n\n")
    assert model.response()[:4] == empty_block


def test_answer_has_its_own_limit_when_there_is_a_budget(tok):
    _, r = run(tok, thinker(tok, tok.encode(" x"), tok.encode(" y" * 50)), thinking_budget=30, max_tokens=5)
    assert (r.stats.reasoning_tokens, r.stats.answer_tokens, r.content) == (30, 5, " y" * 5)
    assert r.stats.finish_reason == "length"


def test_without_budget_max_tokens_counts_every_drawn_token_tags_included(tok):
    _, r = run(tok, thinker(tok, tok.encode(" x"), tok.encode(" y" * 50)), max_tokens=12)
    assert (r.stats.sampled_tokens, r.stats.reasoning_tokens, r.stats.answer_tokens) == (12, 11, 0)  # <think>, 11
    _, r = run(tok, thinker(tok, tok.encode(" x"), tok.encode(" y" * 50), reasoning_len=5), max_tokens=12)
    # <think>, 5 reasoning tokens, </think>, then "\n\n" and 4 answer tokens
    assert (r.stats.reasoning_tokens, r.stats.answer_tokens, r.content) == (5, 5, " y" * 4)
    assert (len(r.token_ids), r.stats.finish_reason) == (12, "length")


def test_stop_string_ends_the_answer_and_is_not_shown(tok):
    script = thinker(tok, tok.encode(" t"), tok.encode("Hello world. STOP here"), reasoning_len=2)
    model = stub(tok, script)
    chunks = list(stream_generate(model, tok, "q", stop=["STOP"]))
    answer = "".join(c.text for c in chunks if c.kind == "answer")
    assert answer == "Hello world. "
    assert chunks[-1].stats.finish_reason == "stop_string"


def test_stop_string_that_never_comes_lets_the_answer_finish(tok):
    script = thinker(tok, tok.encode(" t"), tok.encode("Hello world."), reasoning_len=2)
    _, r = run(tok, script, stop=["never"])
    assert (r.content, r.stats.finish_reason, r.stats.stop_string) == ("Hello world.", "stop", None)


def test_the_stop_string_met_reaches_the_last_chunk_and_the_result(tok):
    # " world" comes in one token: "wor" and "world" both start where the answer is cut; the longer is met.
    script = thinker(tok, tok.encode(" t"), tok.encode("Hello world. STOP here"), reasoning_len=2)
    chunks = list(stream_generate(stub(tok, script), tok, "q", stop=["STOP", "wor", "world"]))
    _, r = run(tok, script, stop=["STOP", "wor", "world"])
    assert (chunks[-1].stats.stop_string, r.stats.stop_string, r.content) == ("world", "world", "Hello ")


def test_reasoning_and_answer_are_separated_by_token_id(tok):
    script = thinker(tok, tok.encode("\nLet me think.\n"), tok.encode("Yes."), reasoning_len=10)
    _, r = run(tok, script)
    # Newlines around the reasoning and before the answer are trimmed, as Qwen3's template does.
    assert (r.reasoning, r.content) == ("Let me think.\n\nLet me think.", "Yes.")
    assert r.text == "<think>Let me think.\n\nLet me think.</think>Yes."


def continuing(tok, seen, continuation):
    """A model that writes `continuation`, then ends its turn, after a response that began with `seen`."""
    eot = tok.token_to_id("<|im_end|>")

    def script(prompt, response):
        i = len(response) - len(seen)
        return continuation[i] if 0 <= i < len(continuation) else eot

    return script


@pytest.mark.parametrize("think", [True, False])
def test_a_prefilled_answer_follows_an_empty_reasoning_block_in_either_mode(tok, think):
    seen = tok.encode("<think>\n\n</think>\n\nThe answer is")
    model = stub(tok, continuing(tok, seen, tok.encode(" 4.")))
    r = generate(model, tok, "2 + 2?", think=think, prefill_response="The answer is")
    assert model.response()[: len(seen)] == seen  # one empty block, whichever template wrote it
    assert (r.reasoning, r.content, r.stats.reasoning_tokens) == ("", " 4.", 0)
    assert r.stats.answer_tokens == len(tok.encode(" 4.")) == 3  # " ", "4", "."


def test_a_prefill_that_opens_the_reasoning_is_continued_as_reasoning(tok):
    seen = tok.encode("<think>\nFirst,")
    model = stub(tok, continuing(tok, seen, tok.encode(" add.") + [tok.think_end_id] + tok.encode("\n\n4")))
    r = generate(model, tok, "2 + 2?", prefill_response="<think>\nFirst,")
    assert model.response()[: len(seen)] == seen
    assert (r.reasoning, r.content, r.stats.reasoning_tokens) == (" add.", "4", 2)


def test_a_prefill_after_token_ids_is_appended_as_it_is(tok):
    model = stub(tok, lambda prompt, response: tok.token_to_id("<|im_end|>"))
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    r = generate(model, tok, ids, prefill_response="Hello")
    assert model.fed == ids + tok.encode("Hello") + [tok.token_to_id("<|im_end|>")]
    assert r.stats.prompt_tokens == len(ids) + 1


def test_options_and_keywords_set_the_same_fields(tok):
    script = thinker(tok, tok.encode(" x"), tok.encode(" y" * 20))
    by_options = run(tok, script, options=GenerationOptions(max_tokens=6, thinking_budget=5))[1]
    by_keywords = run(tok, script, max_tokens=6, thinking_budget=5)[1]
    overridden = run(tok, script, options=GenerationOptions(max_tokens=50, thinking_budget=1), max_tokens=6,
                     thinking_budget=5)[1]
    assert by_options.token_ids == by_keywords.token_ids == overridden.token_ids
    assert (by_options.stats.reasoning_tokens, by_options.stats.answer_tokens) == (5, 6)


def test_an_unknown_keyword_is_an_option_error_that_lists_the_options(tok):
    with pytest.raises(OptionError) as e:
        generate(stub(tok, lambda prompt, response: 0), tok, "q", max_token=5)
    known = sorted(f.name for f in dataclasses.fields(GenerationOptions))
    assert "max_tokens" in known and "thinking_budget" in known
    assert str(e.value) == f"unknown generation option 'max_token'; expected one of {', '.join(known)}"


def test_prefill_progress_is_reported_once_per_chunk(tok):
    calls = []
    generate(stub(tok, lambda prompt, response: 0), tok, list(range(5, 15)), max_tokens=1, prefill_step_size=4,
             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 10), (8, 10), (10, 10)]


class OneSecondPerCall(ScriptedModel):
    """A scripted model whose every call, however many tokens it reads, takes one second of `clock`."""

    def __init__(self, script, header, clock):
        super().__init__(script, header)
        self.clock = clock

    def __call__(self, ids, cache):
        self.clock.seconds += 1.0
        return super().__call__(ids, cache)


def test_the_decode_rate_counts_drawn_tokens_only_and_not_the_forced_pass(tok, monkeypatch):
    # A fake clock that only model calls move: the timings are exact, however busy the machine is.
    clock = SimpleNamespace(seconds=0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: clock.seconds)
    header = tok.encode("<|im_start|>assistant\n")
    budgeted = OneSecondPerCall(thinker(tok, tok.encode(" x"), tok.encode(" y" * 30)), header, clock)
    plain = OneSecondPerCall(thinker(tok, tok.encode(" x"), tok.encode(" y" * 30), reasoning_len=20), header, clock)
    cut = generate(budgeted, tok, "q", thinking_budget=20).stats
    whole = generate(plain, tok, "q").stats
    assert cut.forced_tokens == len(tok.encode(EARLY_STOP_TEXT)) and whole.forced_tokens == 0
    # Not decode steps: the first token (out of the prefill), and the first after the forced pass.
    assert (cut.decode_tokens, whole.decode_tokens) == (cut.sampled_tokens - 2, whole.sampled_tokens - 1)
    # One call, one second, for each of them; the prefill's and the forced pass's seconds are not counted.
    assert (cut.decode_seconds, whole.decode_seconds) == (cut.decode_tokens, whole.decode_tokens)
    assert cut.generation_tps == whole.generation_tps == 1.0


def test_empty_prompt_is_refused_in_raw_mode(tok):
    from qwen3_mlx.errors import Qwen3Error

    with pytest.raises(Qwen3Error, match="^the prompt is empty; give some text$"):
        generate(stub(tok, lambda prompt, response: 0), tok, "", raw=True)


def test_budget_must_not_be_negative():
    from qwen3_mlx.errors import Qwen3Error

    with pytest.raises(Qwen3Error, match=r"^thinking_budget must be >= 0, got -1$"):
        ThinkingBudget(-1)


# ---------------------------------------------------------------- a tiny random model


def test_budget_on_a_random_model_that_starts_inside_reasoning(tiny):
    model, tokenizer = tiny
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    r = generate(model, tokenizer, prompt, raw=True, thinking_budget=8, max_tokens=6, seed=3,
                 logit_bias={t: -1e9 for t in tokenizer.eos_token_ids | {tokenizer.think_end_id}})
    assert r.stats.reasoning_tokens <= 8 and r.stats.budget_exhausted
    assert r.stats.forced_tokens == len(tokenizer.encode(EARLY_STOP_TEXT))
    assert "Considering the limited time by the user" in r.reasoning
    assert r.stats.answer_tokens == 6


def test_a_seeded_request_gives_the_same_tokens_whatever_runs_between_and_leaves_the_global_state(tiny):
    model, tokenizer = tiny
    first = generate(model, tokenizer, "Hello", seed=7, max_tokens=12).token_ids
    mx.random.seed(1)
    generate(model, tokenizer, "Hi", max_tokens=5)  # unseeded: draws from MLX's global state
    state = np.array(mx.random.state[0])
    again = generate(model, tokenizer, "Hello", seed=7, max_tokens=12).token_ids
    assert again == first
    np.testing.assert_array_equal(np.array(mx.random.state[0]), state)


def test_same_seed_same_tokens(tiny):
    model, tokenizer = tiny
    runs = [generate(model, tokenizer, "Hello", seed=s, max_tokens=12).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert runs[0] != runs[2]


def test_rotating_cache_generates_past_its_window(tiny):
    model, tokenizer = tiny
    r = generate(model, tokenizer, "Hello", system="Be brief.", max_kv_size=48, max_tokens=150, seed=0,
                 logit_bias={t: -1e9 for t in tokenizer.eos_token_ids})
    assert r.stats.generated_tokens == 150


def test_prompt_longer_than_the_context_names_the_option(tiny):
    from qwen3_mlx.errors import Qwen3Error

    model, tokenizer = tiny
    with pytest.raises(Qwen3Error) as e:
        generate(model, tokenizer, "word" + " word" * 4999, raw=True)
    assert str(e.value) == ("the prompt has 5000 tokens but the model's context is 4096 (max_position_embeddings); "
                            "shorten it, or use a rotating cache (--max-kv-size, max_kv_size in the API)")


def test_a_malformed_message_with_a_system_prompt_is_one_option_error(tok):
    script = thinker(tok, tok.encode(" a"), tok.encode("b"), reasoning_len=1)
    with pytest.raises(OptionError) as e:
        generate(stub(tok, script), tok, ["hi"], max_tokens=3, system="Be brief.")
    assert str(e.value) == 'messages[0] is a str; give an object like {"role": "user", "content": "..."}'


def test_the_soft_switch_is_read_from_text_parts(tok):
    from qwen3_mlx.text.prompt import Prompt, encode_prompt

    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "/no_think"}]}]
    ids, thinking = encode_prompt(tok, Prompt(parts))
    assert thinking is False
    assert tok.decode(ids).endswith("hi\n/no_think<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("raw", [False, True])
def test_a_blank_prompt_is_refused_with_or_without_the_template(tok, raw):
    from qwen3_mlx.errors import Qwen3Error

    script = thinker(tok, tok.encode(" a"), tok.encode("b"), reasoning_len=1)
    with pytest.raises(Qwen3Error, match="^the prompt is empty; give some text$"):
        generate(stub(tok, script), tok, " \n", raw=raw, max_tokens=2)
