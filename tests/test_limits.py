"""Limits that hold however the model behaves: max_tokens, the context, the prompt's ids, max_tokens=0."""

import pytest
from stubs import ScriptedModel, thinker

from qwen3_mlx.model.cache import RotatingKVCache
from qwen3_mlx.errors import OptionError, Qwen3Error
from qwen3_mlx.generation.single import EARLY_STOP_TEXT, generate, stream_generate


def stub(tok, script, context=4096):
    model = ScriptedModel(script, header=tok.encode("<|im_start|>assistant\n"))
    model.args.max_position_embeddings = context
    return model


def always(token):
    """A model that writes `token` forever (and fails the test past 300 tokens, rather than hang)."""

    def script(prompt, response):
        assert len(response) < 300, "the generation did not stop"
        return token

    return script


# ---------------------------------------------------------------- max_tokens


def test_max_tokens_stops_a_model_that_keeps_opening_its_reasoning(tok):
    think = tok.think_start_id
    r = generate(stub(tok, always(think)), tok, "q", max_tokens=5)
    assert r.token_ids == [think] * 5 and r.stats.finish_reason == "length"
    # The first <think> opens the reasoning; the ones after it are what the model wrote there.
    assert (r.reasoning, r.stats.reasoning_tokens, r.stats.sampled_tokens) == ("<think>" * 4, 4, 5)


def test_max_tokens_stops_a_model_that_keeps_closing_its_reasoning(tok):
    end = tok.think_end_id
    r = generate(stub(tok, always(end)), tok, "q", max_tokens=5)
    assert r.token_ids == [end] * 5 and r.stats.finish_reason == "length"
    assert (r.content, r.stats.answer_tokens) == ("</think>" * 5, 5)


def test_with_a_budget_the_reasoning_and_the_answer_each_have_their_limit(tok):
    think = tok.think_start_id
    r = generate(stub(tok, always(think)), tok, "q", max_tokens=5, thinking_budget=3)
    forced = tok.encode(EARLY_STOP_TEXT)
    assert r.token_ids == [think] * 4 + forced + [think] * 5
    assert (r.stats.reasoning_tokens, r.stats.answer_tokens, r.stats.finish_reason) == (3, 5, "length")
    assert r.stats.budget_exhausted and r.content == "<think>" * 5


def test_a_real_model_biased_to_think_stops_at_max_tokens(tiny):
    model, tokenizer = tiny
    chunks = list(stream_generate(model, tokenizer, "q", max_tokens=5, seed=0,
                                  logit_bias={tokenizer.think_start_id: 100.0}))
    stats = chunks[-1].stats
    assert stats.token_ids == [tokenizer.think_start_id] * 5 and stats.finish_reason == "length"


def test_a_budget_cut_on_a_rotated_cache_drops_the_cut_character_as_on_a_plain_one(tok):
    clef = tok.encode("𝄞")  # two tokens, neither a character on its own
    model = stub(tok, thinker(tok, clef, tok.encode("ok")))
    cache = [RotatingKVCache(8, 0)]  # the prompt alone moves it past its window
    r = generate(model, tok, "question", thinking_budget=41, cache=cache)
    assert r.stats.reasoning_tokens == 41 and r.stats.budget_exhausted  # nothing to take back: no token is
    assert r.reasoning == "𝄞" * 20 + EARLY_STOP_TEXT.split("</think>")[0].rstrip("\n")


# ---------------------------------------------------------------- the context


def test_prompt_and_response_never_exceed_the_context(tok):
    model = stub(tok, always(tok.encode(" word")[0]), context=40)
    r = generate(model, tok, "question", think=False)
    prompt = r.stats.prompt_tokens
    assert (prompt + len(r.token_ids), r.stats.finish_reason) == (40, "length")
    assert len(model.fed) == 40  # the last token is run at position 39, the context's last


def test_a_given_cache_is_bounded_by_the_context_too(tok):
    model = stub(tok, always(tok.encode(" word")[0]), context=40)
    cache = model.make_cache()
    list(stream_generate(model, tok, "question", think=False, max_tokens=1, cache=cache))
    # Now the cache holds the prompt, as the ones chat and --prompt-cache pass do.
    r = generate(model, tok, "question", think=False, cache=cache)
    assert r.stats.cached_tokens == r.stats.prompt_tokens - 1
    assert (r.stats.prompt_tokens + len(r.token_ids), r.stats.finish_reason) == (40, "length")
    assert cache[0].offset == 40


def test_forced_text_that_does_not_fit_in_the_context_is_cut_there(tok):
    model = stub(tok, thinker(tok, tok.encode(" x"), tok.encode("ok")), context=30)
    r = generate(model, tok, "q", thinking_budget=4)
    prompt, forced = r.stats.prompt_tokens, tok.encode(EARLY_STOP_TEXT)
    room = 30 - prompt
    assert r.token_ids == [tok.think_start_id] + tok.encode(" x") * 4 + forced[: room - 5]
    assert (r.stats.finish_reason, r.stats.forced_tokens, r.content) == ("length", room - 5, "")


def test_a_prompt_that_fills_the_context_computes_nothing(tok):
    model = stub(tok, always(0), context=12)
    ids = tok.encode("one two three four five six seven eight nine ten eleven twelve")
    assert len(ids) == 12
    r = generate(model, tok, ids)
    assert (r.token_ids, r.stats.finish_reason, r.stats.prompt_tokens, model.fed) == ([], "length", 12, [])


# ---------------------------------------------------------------- the prompt's ids


@pytest.mark.parametrize("bad, position", [(10**7, 1), (2**31, 1), (-3, 1), (151936, 2)])
def test_token_ids_outside_the_vocabulary_are_refused_before_anything_runs(tok, bad, position):
    model = stub(tok, always(0))
    ids = [5, 6, 7][:position] + [bad]
    with pytest.raises(OptionError) as e:
        generate(model, tok, ids)
    assert str(e.value) == (f"prompt token {position} is id {bad}, outside the model's vocabulary [0, 151936); "
                            "give ids that the tokenizer makes")
    assert model.fed == []


def test_the_largest_id_of_the_model_is_accepted(tok):
    r = generate(stub(tok, always(tok.token_to_id("<|im_end|>"))), tok, [5, 151935])
    assert r.stats.finish_reason == "stop"


# ---------------------------------------------------------------- max_tokens=0 and stop strings


def test_max_tokens_zero_computes_nothing(tok):
    model = stub(tok, always(0))
    chunks = list(stream_generate(model, tok, "question", max_tokens=0, thinking_budget=5))
    assert [(c.text, c.kind) for c in chunks] == [("", "answer")]
    stats = chunks[0].stats
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "question"}]))
    assert (stats.finish_reason, stats.prompt_tokens, stats.token_ids) == ("length", len(prompt), [])
    assert model.fed == []


def test_an_empty_stop_string_is_refused(tok):
    model = stub(tok, always(0))
    with pytest.raises(OptionError) as e:
        generate(model, tok, "question", stop=["ok", ""])
    assert str(e.value) == "stop='': a stop string must be non-empty text"
    assert model.fed == []


# ---------------------------------------------------------------- a tiny random model


def test_a_prompt_too_long_is_refused_with_a_given_cache_too(tiny):
    model, tokenizer = tiny
    with pytest.raises(Qwen3Error) as e:
        generate(model, tokenizer, "word" + " word" * 4999, raw=True, cache=model.make_cache())
    assert str(e.value).startswith("the prompt has 5000 tokens but the model's context is 4096")
