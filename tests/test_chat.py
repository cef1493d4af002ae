"""Chat: the KV cache reused across turns, trimmed to the common prefix; cache files; the chat CLI."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint
from click.testing import CliRunner
from stubs import ScriptedModel, thinker

from qwen3_mlx.generation.chat import ChatSession
from qwen3_mlx.cli.commands import main
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generation.single import generate
from qwen3_mlx.checkpoint.loader import load
from qwen3_mlx.text.prompt import Prompt, encode_prompt
from qwen3_mlx.generation.prompt_cache import common_prefix, load_cache, save_cache


def small(path, **kw):
    return make_checkpoint(path, tokenizer=True, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return small(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def tiny(ckpt):
    return load(ckpt)


def drain(chunks):
    return "".join(c.text for c in chunks if c.kind == "answer")


def test_turn_three_equals_a_fresh_run_on_the_whole_conversation(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, system="You are terse.", think=False, max_tokens=12, seed=5)
    drain(session.send("Hello there"))
    for turn in (2, 3):
        before = list(session.cached)
        prompt = session.render(session.messages + [{"role": "user", "content": f"turn {turn}"}])
        drain(session.send(f"turn {turn}"))
        stats = session.last
        # Only what differs from the cache was computed.
        assert stats.cached_tokens == common_prefix(before, prompt) > 0
        # The cache holds the prompt and the response, exactly.
        assert session.cached == prompt + stats.token_ids
        assert session.cache[0].offset == len(session.cached)
    fresh = generate(model, tok, session.messages[:-1], system="You are terse.", think=False, max_tokens=12, seed=5)
    assert fresh.token_ids == session.last.token_ids
    assert session.messages[-1] == {"role": "assistant", "content": fresh.content}


def test_earlier_reasoning_is_dropped_and_the_cache_trimmed_to_where_it_began(tok_stub):
    tok, header = tok_stub
    script = thinker(tok, tok.encode(" hmm"), tok.encode("Fine."), reasoning_len=6)
    session = ChatSession(ScriptedModel(script, header=header), tok, max_tokens=100, eager=False)
    drain(session.send("one"))
    assert session.messages[-1] == {"role": "assistant", "content": "Fine."}
    first_response = session.last.token_ids
    assert first_response[0] == tok.think_start_id
    cached_before = list(session.cached)
    drain(session.send("two"))
    # The template drops the <think> block, so reuse stops where the first answer's reasoning began.
    assert session.last.cached_tokens == len(cached_before) - len(first_response)
    assert session.last.reasoning_tokens == 6


def test_eager_session_rereads_the_answer_without_reasoning_before_the_next_message(tok_stub):
    tok, header = tok_stub
    script = thinker(tok, tok.encode(" hmm"), tok.encode("Fine."), reasoning_len=6)
    session = ChatSession(ScriptedModel(script, header=header), tok, max_tokens=100)
    drain(session.send("one"))
    # The history as the next turn renders it: the answer without its reasoning block.
    history = tok.encode("<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n")
    assert session.cached == history and session.cache[0].offset == len(history)
    drain(session.send("two"))
    assert session.last.cached_tokens == len(history)  # only the new message was computed


@pytest.fixture(scope="module")
def tok_stub():
    from checkpoints import tokenizer_dir

    from qwen3_mlx.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir())
    tok.eos_token_ids = frozenset({tok.token_to_id("<|im_end|>")})
    return tok, tok.encode("<|im_start|>assistant\n")


def test_trimmed_cache_gives_the_logits_of_a_cache_filled_with_the_prefix(tiny):
    model, _ = tiny
    ids = mx.array(np.arange(40)[None] * 7 % 500)
    full = model.make_cache()
    model(ids, full)
    for c in full:
        c.trim(15)
    short = model.make_cache()
    model(ids[:, :25], short)
    probe = mx.array([[11, 12, 13]])
    np.testing.assert_allclose(np.array(model(probe, full)), np.array(model(probe, short)), atol=1e-5)


def test_cache_file_round_trip_gives_the_same_logits(tiny, tmp_path):
    model, _ = tiny
    for cache in (model.make_cache(), model.make_cache(20, 4)):
        ids = list(range(100, 130))
        model(mx.array([ids]), cache)
        save_cache(tmp_path / "c.safetensors", cache, ids, model, {"note": "x"})
        loaded, tokens, extra = load_cache(tmp_path / "c.safetensors", model)
        assert (tokens, extra, loaded[0].offset) == (ids, {"note": "x"}, 30)
        probe = mx.array([[5, 6]])
        np.testing.assert_allclose(np.array(model(probe, loaded)), np.array(model(probe, cache)), atol=1e-6)


def test_cache_file_from_another_model_is_refused(tiny, tmp_path):
    model, _ = tiny
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    save_cache(tmp_path / "c.safetensors", cache, [1, 2, 3], model)
    other, _ = load(small(tmp_path / "other", seed=9))
    with pytest.raises(Qwen3Error) as e:
        load_cache(tmp_path / "c.safetensors", other)
    assert str(e.value) == (f"{tmp_path / 'c.safetensors'}: was made with another model or quantization; "
                            "delete it or pass another file")


def test_cache_file_from_another_quantization_is_refused(tiny, tmp_path):
    import mlx.nn as nn

    model, _ = tiny
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache)
    save_cache(tmp_path / "c.safetensors", cache, [1, 2, 3], model)
    quantized, _ = load(small(tmp_path / "q"))  # the same weights (same seed), then quantized
    nn.quantize(quantized, group_size=32, bits=4)
    object.__setattr__(quantized.args, "quantization", {"group_size": 32, "bits": 4})
    with pytest.raises(Qwen3Error, match="was made with another model or quantization"):
        load_cache(tmp_path / "c.safetensors", quantized)


def test_rotating_cache_past_its_window_is_rebuilt_and_the_chat_goes_on(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=40, max_kv_size=48, seed=1,
                          logit_bias={t: -1e9 for t in tok.eos_token_ids})
    drain(session.send("first message"))
    assert not session.cache[0].is_trimmable()
    drain(session.send("second"))
    assert session.last.cached_tokens == 0 and session.last.answer_tokens == 40


def test_chat_cli_through_stdin(ckpt, tmp_path):
    save = tmp_path / "conv.safetensors"
    lines = ["/help", "/no_think", "Hello", "/budget 5", "/think", "How are you?", "/stats", f"/save {save}",
             "/bogus", "/reset", f"/load {save}", "/system Be kind.", "And now?", "/quit", "never read"]
    result = CliRunner().invoke(main, ["chat", "--model", str(ckpt), "--max-tokens", "6", "--seed", "0"],
                                input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "commands:" in err and "thinking off" in err and "thinking budget: 5" in err
    assert "error: unknown command /bogus; /help lists them" in err
    assert "new conversation" in err and "system prompt set" in err
    assert "loaded 4 messages" in err and "reasoning:" in err
    assert save.exists()


def test_generate_prompt_cache_reuses_the_shared_prefix(ckpt, tmp_path):
    cache_file = tmp_path / "prefix.safetensors"
    system = "You answer questions about this document. " * 20
    runs = []
    for question in ("first question", "second question", "second question"):
        args = ["generate", "--model", str(ckpt), "--system", system, "--prompt", question, "--max-tokens", "5",
                "--seed", "3", "--no-think", "--verbose", "--prompt-cache", str(cache_file)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        runs.append(result)
    assert "(0 cached)" in runs[0].stderr
    cached_second = int(runs[1].stderr.split("tokens (")[1].split(" cached")[0])
    _, tok = load(ckpt)
    first, second = (encode_prompt(tok, Prompt(q, system=system), think=False)[0] for q in ("first question", "second question"))
    assert cached_second == common_prefix(first, second) > 140  # the whole system turn came from the file
    assert runs[1].stdout == runs[2].stdout
    plain = CliRunner().invoke(main, ["generate", "--model", str(ckpt), "--system", system, "--prompt",
                                      "second question", "--max-tokens", "5", "--seed", "3", "--no-think"])
    assert plain.stdout == runs[1].stdout


def test_an_interrupted_step_leaves_every_layer_holding_the_same_tokens(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, think=False, max_tokens=4, seed=0)
    drain(session.send("hi"))
    held = list(session.cached)
    # Ctrl-C while a step was being built: the first layer already took one more token.
    session.cache[0].update_and_fetch(*(mx.zeros((1, 1, 1, 16)),) * 2)
    session._settle(held, None)
    assert {c.offset for c in session.cache} == {len(held)} and session.cached == held


def test_ctrl_c_mid_answer_keeps_the_exchange_marked_and_its_figures(tok_stub):
    tok, _ = tok_stub
    header = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    answer = tok.encode("One two three four five six")

    def script(prompt, response):
        if len(response) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fifth token is computed
        return answer[len(response)]

    session = ChatSession(ScriptedModel(script, header=header), tok, think=False, max_tokens=20, eager=False)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in session.send("count"):
            shown.append(chunk.text)
    # The history and the figures hold what was shown; the cache is trimmed back to the same tokens.
    shown_ids = session.last.token_ids
    assert len(shown_ids) >= 3 and shown_ids == answer[: len(shown_ids)]
    assert session.messages == [{"role": "user", "content": "count"},
                                {"role": "assistant", "content": tok.decode(shown_ids), "interrupted": True}]
    assert "".join(shown) == tok.decode(shown_ids) and session.last.finish_reason == "interrupted"
    assert session.cached[-len(shown_ids):] == shown_ids and session.cache[0].offset == len(session.cached)


def test_set_thinking_appends_the_soft_switch_to_the_next_message_only(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, max_tokens=2, temp=0, eager=False)
    session.set_thinking(False)
    drain(session.send("one"))
    drain(session.send("two"))
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["one /no_think", "two"]
    assert session.thinking is False and session.options.think is True  # the options keep the starting mode
    session.reset()
    assert session.thinking is True and session.messages == [] and session.last is None


def test_set_system_takes_effect_on_the_next_render(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, think=False)
    hi = [{"role": "user", "content": "hi"}]
    session.set_system("Be brief.")
    assert session.render(hi) == session.tokenizer.encode(session.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + hi, add_generation_prompt=True, enable_thinking=False))
    session.set_system("")
    assert session.system is None and session.render(hi) == ChatSession(model, tok, think=False).render(hi)


def test_options_and_keywords_make_the_session_options(tiny):
    from qwen3_mlx.errors import OptionError
    from qwen3_mlx.generation.options import GenerationOptions

    model, tok = tiny
    base = GenerationOptions(think=False, max_tokens=7, temp=0.0)
    session = ChatSession(model, tok, base, max_kv_size=64)
    assert session.options == GenerationOptions(think=False, max_tokens=7, temp=0.0, max_kv_size=64)
    assert base.max_kv_size is None  # options are frozen: the keywords made a new value
    drain(session.send("hi"))
    assert session.cache[0].max_size == 64
    with pytest.raises(OptionError, match="unknown generation option 'tmp'"):
        ChatSession(model, tok, tmp=0.5)


def test_a_tool_result_then_a_user_message_renders_as_transformers_does(tiny):
    from checkpoints import tokenizer_dir
    from transformers import AutoTokenizer

    model, tok = tiny
    tools = [{"type": "function", "function": {"name": "now", "description": "The time.",
                                                "parameters": {"type": "object", "properties": {}}}}]
    session = ChatSession(model, tok, tools=tools, system="Be brief.", think=False, max_tokens=3, temp=0)
    drain(session.send("What time is it?"))
    session.add_tool_result("12:00", name="now")
    drain(session.send("And in Tokyo?"))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "user", "assistant"]
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    history = [{"role": "system", "content": "Be brief."}] + session.messages[:-1]
    expected = hf.encode(hf.apply_chat_template(history, tools=tools, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=False), add_special_tokens=False)
    assert session.cached[: len(expected)] == expected
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>" in tok.decode(expected)


def test_a_chat_stops_at_the_context_and_refuses_a_turn_past_it_keeping_the_conversation(tok_stub):
    from qwen3_mlx.errors import Qwen3Error

    tok, header = tok_stub
    (word,) = tok.encode(" word")
    model = ScriptedModel(lambda prompt, response: word, header=header)
    model.args.max_position_embeddings = 40
    session = ChatSession(model, tok, think=False, max_tokens=100, eager=False)
    drain(session.send("question"))
    assert session.last.finish_reason == "length"
    assert session.last.prompt_tokens + len(session.last.token_ids) == 40 == session.cache[0].offset
    history = list(session.messages)
    with pytest.raises(Qwen3Error, match=r"^the prompt has \d+ tokens but the model's context is 40 "):
        drain(session.send("more"))
    assert session.messages == history and session.cache[0].offset == len(session.cached)
    session.reset()
    drain(session.send("again"))  # a new conversation fits again
    assert session.last.finish_reason == "length"


def test_ctrl_c_before_the_first_token_keeps_the_message_with_an_empty_interrupted_answer(tok_stub):
    tok, header = tok_stub

    def script(prompt, response):
        raise KeyboardInterrupt  # while the prompt is read

    session = ChatSession(ScriptedModel(script, header=header), tok, think=False, eager=False)
    with pytest.raises(KeyboardInterrupt):
        drain(session.send("hello"))
    assert session.messages == [{"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "", "interrupted": True}]
    assert session.last is None  # no figures: nothing was generated
    # The cache holds what was read of the prompt, and the next turn reuses it.
    prompt = session.render(session.messages[:1])
    assert session.cache[0].offset == len(session.cached) > 0 and session.cached == prompt[: len(session.cached)]
