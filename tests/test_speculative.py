"""Speculative decoding: greedy tokens equal the plain loop's (prompt lookup and a draft model), every
limit acts at the same token, the acceptance rule keeps the target's distribution, seeds repeat."""

from collections import Counter

import mlx.core as mx
import pytest
from checkpoints import make_checkpoint
from stubs import ScriptedModel

from qwen3_mlx import generate, load
from qwen3_mlx.generation.batch import batch_generate
from qwen3_mlx.errors import OptionError
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.generation.options import EngineOptions, GenerationOptions
from qwen3_mlx.generation.picker import Picker
from qwen3_mlx.generation.response import EARLY_STOP_TEXT
from qwen3_mlx.checkpoint.sampling_defaults import SamplingParams
from qwen3_mlx.generation.sampling import make_sampler
from qwen3_mlx.generation.proposers import PromptLookup
from qwen3_mlx.generation.verification import DraftLength, accept

GREEDY = dict(temp=0.0, top_k=0, top_p=1.0, min_p=0.0)
LOOKUP = dict(prompt_lookup=True, num_draft_tokens=4)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Another random tiny model of the same family: a draft that disagrees with `tiny`."""
    path = make_checkpoint(tmp_path_factory.mktemp("draft"), tokenizer=True, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, seed=7)
    return load(path)


def cycler(tok, text, stop_after=None):
    """A script that writes `text` over and over (an end of turn after `stop_after` tokens, if given)."""
    ids = tok.encode(text)

    def script(prompt, response):
        if stop_after is not None and len(response) >= stop_after:
            return tok.token_to_id("<|im_end|>")
        return ids[len(response) % len(ids)]

    return script


def stub(tok, script):
    return ScriptedModel(script, tok.encode("<|im_start|>assistant\n"))


# ---------------------------------------------------------------- greedy: the target's own tokens


@pytest.mark.parametrize("prompt", ["one two three one two three one two", "Why is the sky blue?"])
def test_prompt_lookup_and_a_draft_give_the_plain_greedy_tokens(tiny, other_tiny, prompt):
    model, tok = tiny
    plain = generate(model, tok, prompt, think=False, max_tokens=40, **GREEDY)
    looked = generate(model, tok, prompt, think=False, max_tokens=40, **GREEDY, **LOOKUP)
    drafted = generate(model, tok, prompt, think=False, max_tokens=40, draft_model=other_tiny[0], **GREEDY)
    same = generate(model, tok, prompt, think=False, max_tokens=40, draft_model=model, **GREEDY)
    assert plain.token_ids == looked.token_ids == drafted.token_ids == same.token_ids
    assert same.stats.accepted_tokens == same.stats.drafted_tokens > 0  # the target drafting for itself
    assert looked.stats.drafted_tokens > 0


def test_an_end_of_turn_inside_a_draft_ends_the_response_there(tok):
    model = stub(tok, cycler(tok, " la di da", stop_after=15))  # the response holds the empty block's 4 first
    plain = generate(model, tok, "sing la di da la di da", think=False, **GREEDY)
    looked = generate(model, tok, "sing la di da la di da", think=False, **GREEDY, **LOOKUP)
    assert looked.token_ids == plain.token_ids and looked.token_ids[-1] == tok.token_to_id("<|im_end|>")
    assert plain.stats.finish_reason == looked.stats.finish_reason == "stop"
    assert looked.stats.accepted_tokens > 0


def test_a_stop_string_and_max_tokens_inside_a_draft_act_at_the_same_token(tok):
    model = stub(tok, cycler(tok, " la di da"))
    prompt = "sing la di da la di da"
    for options in (dict(stop=["di da la"]), dict(max_tokens=7), dict(max_total_tokens=5)):
        plain = generate(model, tok, prompt, think=False, **GREEDY, **options)
        looked = generate(model, tok, prompt, think=False, **GREEDY, **options, **LOOKUP)
        assert (looked.token_ids, looked.content, looked.stats.finish_reason) == (
            plain.token_ids, plain.content, plain.stats.finish_reason), options
        assert looked.stats.drafted_tokens > 0


def test_the_thinking_budget_cuts_at_the_same_token_inside_a_draft(tok):
    (a,) = tok.encode(" a")

    def script(prompt, response):
        if not response:
            return tok.think_start_id
        return tok.token_to_id("<|im_end|>") if tok.think_end_id in response else a

    model = stub(tok, script)
    for budget in (3, 7, 10):
        plain = generate(model, tok, "Why? a a a a a a", thinking_budget=budget, **GREEDY)
        looked = generate(model, tok, "Why? a a a a a a", thinking_budget=budget, **GREEDY, **LOOKUP)
        assert looked.token_ids == plain.token_ids and looked.stats.reasoning_tokens == budget
        assert looked.reasoning == plain.reasoning and EARLY_STOP_TEXT.strip()[:20] in looked.reasoning
        assert looked.stats.accepted_tokens > (0 if budget > 3 else -1)  # 3: cut before a draft is checked


def test_structured_output_cuts_drafts_the_grammar_refuses(tiny):
    model, tok = tiny
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    options = dict(json_schema=schema, think=False, max_tokens=24, **GREEDY)
    plain = generate(model, tok, '{"n": 1} {"n": 2} {"n": 3}', **options)
    looked = generate(model, tok, '{"n": 1} {"n": 2} {"n": 3}', **options, **LOOKUP)
    assert looked.token_ids == plain.token_ids and looked.content == plain.content


def test_logprobs_are_the_plain_loops(tiny):
    model, tok = tiny
    prompt = "one two three one two three one two"
    plain = generate(model, tok, prompt, think=False, max_tokens=12, logprobs=3, **GREEDY)
    looked = generate(model, tok, prompt, think=False, max_tokens=12, logprobs=3, **GREEDY, **LOOKUP)
    assert [p.token for p in looked.logprobs] == [p.token for p in plain.logprobs]
    assert [p.logprob for p in looked.logprobs] == pytest.approx([p.logprob for p in plain.logprobs], abs=1e-4)
    assert [[t for t, _ in p.top] for p in looked.logprobs] == [[t for t, _ in p.top] for p in plain.logprobs]


# ---------------------------------------------------------------- in a batch: each row as alone


def alone_and_batched(model, tok, requests, **whole):
    """Each (prompt, options) alone through generate, and all of them through one batch_generate."""
    alone = [generate(model, tok, prompt, **options, **whole) for prompt, options in requests]
    batched = batch_generate(model, tok, [prompt for prompt, _ in requests], [GenerationOptions(**options)
                             for _, options in requests], **whole)
    return alone, batched


def same(a, b):
    return (a.token_ids, a.content, a.reasoning, a.stats.finish_reason, a.stats.drafted_tokens,
            a.stats.accepted_tokens) == (b.token_ids, b.content, b.reasoning, b.stats.finish_reason,
                                         b.stats.drafted_tokens, b.stats.accepted_tokens)


def test_a_batch_of_8_with_a_draft_gives_each_row_its_tokens_alone(tiny, other_tiny):
    """Rows that draft and rows that do not (num_draft_tokens 0), greedy and seeded, with logprobs, a
    penalty, a grammar and a stop string, each row's tokens and counts are those it gets alone with the
    same draft; the greedy ones are the plain loop's."""
    model, tok = tiny
    plain = dict(think=False, max_tokens=16)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    requests = [("Why is the sky blue?", dict(**plain, **GREEDY)),
                ("Hi", dict(**plain, temp=0.8, seed=5)),
                ("one two three one two", dict(**plain, **GREEDY, logprobs=2)),
                ("Tell me more", dict(**plain, **GREEDY, num_draft_tokens=0)),
                ("Count", dict(**plain, temp=1.0, top_k=3, presence_penalty=1.5, seed=9)),
                ('{"n": 1}', dict(**plain, **GREEDY, json_schema=schema)),
                ("Stop here", dict(**plain, **GREEDY, stop=["e"])),
                ("A longer prompt than the others, by some way", dict(think=False, max_tokens=5, **GREEDY))]
    for draft in (other_tiny[0], model):
        alone, batched = alone_and_batched(model, tok, requests, draft_model=draft)
        assert [same(a, b) for a, b in zip(alone, batched)] == [True] * 8
        assert [p.logprob for p in batched[2].logprobs] == [p.logprob for p in alone[2].logprobs]
        assert batched[3].stats.drafted_tokens == 0 and batched[0].stats.drafted_tokens > 0
    for i in (0, 2, 3, 5, 6, 7):
        assert batched[i].token_ids == generate(model, tok, requests[i][0], **requests[i][1]).token_ids


def test_prompt_lookup_in_a_batch_acts_at_the_same_tokens_as_alone(tok):
    """An end of turn, a stop string, max_tokens, max_total_tokens and the thinking budget's cut inside
    drafts, each in a row of one batch, beside rows that do not look up."""
    (a,) = tok.encode(" a")
    cycle, eot = tok.encode(" la di da"), tok.token_to_id("<|im_end|>")

    def script(prompt, response):
        if tok.decode(prompt).rstrip().endswith("a a a a a a<|im_end|>\n<|im_start|>assistant"):
            if not response:
                return tok.think_start_id
            return eot if tok.think_end_id in response else a
        if "stop" in tok.decode(prompt) and len(response) >= 15:
            return eot
        return cycle[len(response) % len(cycle)]

    model = stub(tok, script)
    song = "sing la di da la di da"
    requests = [(song + " stop", dict(think=False, **GREEDY, **LOOKUP)),
                (song, dict(think=False, stop=["di da la"], **GREEDY, **LOOKUP)),
                (song, dict(think=False, max_tokens=7, **GREEDY, **LOOKUP)),
                (song, dict(think=False, max_total_tokens=5, **GREEDY, **LOOKUP)),
                ("Why? a a a a a a", dict(thinking_budget=7, **GREEDY, **LOOKUP)),
                ("Why? a a a a a a", dict(thinking_budget=3, **GREEDY, **LOOKUP)),
                (song, dict(think=False, max_tokens=20, **GREEDY)),
                (song, dict(think=False, max_tokens=30, **GREEDY, **LOOKUP))]
    alone, batched = alone_and_batched(model, tok, requests)
    assert [same(a, b) for a, b in zip(alone, batched)] == [True] * 8
    assert batched[0].token_ids[-1] == eot and batched[4].stats.reasoning_tokens == 7
    assert [b.stats.drafted_tokens > 0 for b in batched] == [True] * 6 + [False, True]
    assert [b.stats.accepted_tokens > 0 for b in batched] == [True, False, True, True, True, False, False, True]
    for (prompt, options), b in zip(requests, batched):  # and the plain loop's
        plain = {k: v for k, v in options.items() if k not in LOOKUP}
        assert b.token_ids == generate(model, tok, prompt, **plain).token_ids


def test_a_rotating_cache_that_wraps_while_drafting_gives_the_plain_tokens_alone_and_in_a_batch(tiny, other_tiny):
    """max_kv_size with drafts rejected after the window has wrapped: one stream takes them back
    (RotatingKVCache.rollback), a batch's row takes back its own; both give the plain rotating loop's
    tokens."""
    model, tok = tiny
    prompts = ["Why is the sky blue?", "one two three one two three", "Hi"]
    options = dict(think=False, max_tokens=40, max_kv_size=32, **GREEDY)
    plain = [generate(model, tok, p, **options).token_ids for p in prompts]
    for draft in (model, other_tiny[0]):
        alone = [generate(model, tok, p, draft_model=draft, **options) for p in prompts]
        batched = batch_generate(model, tok, prompts, draft_model=draft, **options)
        assert [r.token_ids for r in alone] == [r.token_ids for r in batched] == plain
        assert [(r.stats.drafted_tokens, r.stats.accepted_tokens) for r in alone] == [
            (r.stats.drafted_tokens, r.stats.accepted_tokens) for r in batched]
        if draft is model:
            # The draft keeps the whole text, the target its window: past the wrap they part now and then,
            # and the target's rejections are taken back there.
            assert all(0 < r.stats.accepted_tokens < r.stats.drafted_tokens for r in batched)
    assert sum(r.stats.drafted_tokens - r.stats.accepted_tokens for r in alone) > 10


def test_the_context_ends_a_drafting_response_at_the_same_token_alone_and_in_a_batch(tmp_path):
    """A model whose context (48 positions) ends the response: drafts checked past it are taken back, and
    every path stops where the plain loop does, with finish_reason length."""
    model, tok = load(make_checkpoint(tmp_path, tokenizer=True, max_position_embeddings=48))
    prompts = ["one two three one two three one two", "Why is the sky blue?"]
    options = dict(think=False, max_tokens=200, **GREEDY)
    plain = [generate(model, tok, p, **options) for p in prompts]
    assert [len(r.token_ids) + r.stats.prompt_tokens for r in plain] == [48, 48]
    alone = [generate(model, tok, p, draft_model=model, **options) for p in prompts]
    batched = batch_generate(model, tok, prompts, draft_model=model, **options)
    for runs in (alone, batched):
        assert [(r.token_ids, r.stats.finish_reason) for r in runs] == [(r.token_ids, "length") for r in plain]
        # The model drafting for itself: every draft kept, the last ones checked at the context's end.
        assert all(r.stats.accepted_tokens == r.stats.drafted_tokens > 0 for r in runs)


def test_the_engine_and_the_server_draft_for_every_request_and_count_the_predictions(tiny, other_tiny):
    """serve --draft-model: each answer is the request's alone with that draft (the OpenAI SDK reads it),
    usage says how many drafts were kept and not; num_draft_tokens 0 turns it off for one request;
    the draft's caches count in the engine's KV figure; prompt_lookup is refused where nothing speculates."""
    import openai
    from server_live import LiveServer

    from qwen3_mlx.generation.engine import Engine
    from qwen3_mlx.server import ServerSettings, create_app

    model, tok = tiny
    draft = other_tiny[0]
    with Engine(model, tok, draft_model=draft) as engine, LiveServer(create_app(engine, ServerSettings(("m",)))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)

        def ask(prompt, **extra):
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}, **extra})

        reply, alone = ask("Why is the sky blue?"), generate(model, tok, "Why is the sky blue?", think=False,
                                                            max_tokens=16, draft_model=draft, **GREEDY)
        assert reply.choices[0].message.content == alone.content
        details = reply.usage.completion_tokens_details
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (
            alone.stats.accepted_tokens, alone.stats.drafted_tokens - alone.stats.accepted_tokens)
        assert alone.stats.drafted_tokens > 0
        details = ask("Why is the sky blue?", num_draft_tokens=0).usage.completion_tokens_details
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)
        request = engine.submit("Count to a hundred", think=False, max_tokens=200, **GREEDY)
        next(iter(request))  # in the batch: its cache and its draft's
        draft_cache = engine.scheduler.gen.draft.nbytes
        assert draft_cache > 0 and engine.memory()["kv"] >= draft_cache
        request.cancel()
    # The ceiling counts the draft: its weights, its cache per row, and a decode pass of 1 + k positions.
    from qwen3_mlx.generation.scheduler import Scheduler
    from qwen3_mlx.generation.memory import forward_bytes, weight_bytes

    plain, drafted = (Scheduler(model, tok, memory_limit=10**12, draft_model=d).plan for d in (None, draft))
    drafted.width = 5
    rows, longest = 3, 100
    assert drafted.need(rows, longest, 10, 10) - plain.need(rows, longest, 10, 10) >= (
        weight_bytes(draft) + rows * longest * draft.kv_bytes_per_token()
        + forward_bytes(model, 5, longest, rows) - forward_bytes(model, 1, longest, rows))
    with Engine(model, tok) as engine:
        with pytest.raises(OptionError) as e:
            engine.submit("Hi", prompt_lookup=True)
    assert str(e.value) == ("prompt_lookup: this batch does not speculate; start it with prompt_lookup (serve "
                            "--prompt-lookup) or a draft model")


def test_serve_refuses_a_draft_in_a_pipeline(tiny_checkpoint):
    from click.testing import CliRunner

    from qwen3_mlx.cli import commands as cli

    run = CliRunner().invoke(cli.main, ["serve", "--model", str(tiny_checkpoint), "--draft-model",
                                        str(tiny_checkpoint), "--parallel", "pipeline"])
    assert run.exit_code == 2 and ("--draft-model does not go with --parallel pipeline: its steps would wait on each "
                                   "other across the ranks; use --parallel tensor, or --prompt-lookup") in run.stderr


# ---------------------------------------------------------------- sampling


def test_the_acceptance_rule_keeps_the_targets_distribution():
    """One drafted token from q, accepted or replaced: the token that comes out is distributed as p."""
    p = mx.array([0.5, 0.2, 0.2, 0.1, 0.0])
    q = mx.array([0.1, 0.1, 0.3, 0.2, 0.3])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    draws = Picker(make_sampler(params, None), params=params)
    n, counts = 4000, Counter()
    drafts = mx.random.categorical(mx.broadcast_to(mx.log(q), (n, 5)), key=mx.random.key(1)).tolist()
    keys = mx.random.split(mx.random.key(2), n)
    for i in range(n):
        kept, token = accept(draws, [drafts[i]], mx.stack([p, p]), q[None], keys[i])
        counts[drafts[i] if kept else token.item()] += 1
    expected = [n * x for x in p.tolist()]
    chi2 = sum((counts[i] - e) ** 2 / e for i, e in enumerate(expected) if e)
    assert counts[4] == 0  # p is 0 there: never given out
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_a_point_mass_draft_is_kept_with_its_target_probability():
    p = mx.array([0.25, 0.75])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    draws = Picker(make_sampler(params, None), params=params)
    keys = mx.random.split(mx.random.key(3), 2000)
    kept = sum(accept(draws, [1], mx.stack([p, p]), None, keys[i])[0] for i in range(2000))
    assert abs(kept / 2000 - 0.75) < 0.04


def test_sampling_with_a_mismatched_draft_follows_the_target(tiny, other_tiny):
    """The first two tokens, plain and with a draft that disagrees (top-k 3 and a penalty on), seed by
    seed: the two joint distributions agree (chi-square), though the draws differ."""
    model, tok = tiny
    options = dict(think=False, max_tokens=2, temp=1.0, top_k=3, top_p=1.0, presence_penalty=1.5,
                   num_draft_tokens=2)
    n = 200  # in batches of 64 (a speculative batch's row draws as it does alone, tests above)
    seeds = [GenerationOptions(seed=s, **options) for s in range(n)]
    rows = EngineOptions(max_batch=64)
    plain = Counter(tuple(r.token_ids) for r in batch_generate(model, tok, ["Hi"] * n, seeds, engine_options=rows))
    drafted = Counter(tuple(r.token_ids) for r in batch_generate(model, tok, ["Hi"] * n, seeds, engine_options=rows,
                                                                 draft_model=other_tiny[0]))
    cells = [c for c in set(plain) | set(drafted) if plain[c] + drafted[c] >= 10]
    chi2 = sum((plain[c] - drafted[c]) ** 2 / (plain[c] + drafted[c]) for c in cells)
    assert chi2 < 3.0 * max(len(cells) - 1, 1) + 10  # well below what a wrong rule gives (hundreds)


def test_seeded_speculative_sampling_repeats(tiny, other_tiny):
    model, tok = tiny
    runs = [generate(model, tok, "Hi", think=False, max_tokens=20, temp=0.8, seed=5, draft_model=other_tiny[0])
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].stats.drafted_tokens > 0


# ---------------------------------------------------------------- proposers and the draft length


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(2, 3)
    assert lookup.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2, None).tokens == [7, 5]
    assert lookup.propose([1, 2, 3, 4], 2, None).tokens == []
    assert lookup.propose([5, 6, 1, 2, 8, 1, 2], 4, None).tokens == [8, 1, 2]


def test_the_draft_length_grows_shrinks_and_rests():
    length = DraftLength(6, patience=2, rest=3)
    assert length.next() == 2
    length.update(2, 2)
    assert length.next() == 3
    length.update(3, 1)
    assert length.next() == 2
    length.update(2, 0)
    length.update(1, 0)
    assert [length.next() for _ in range(4)] == [0, 0, 0, 1]


def test_a_draft_of_another_vocabulary_is_refused(tiny, tmp_path):
    model, tok = tiny
    other = load_model(make_checkpoint(tmp_path, vocab_size=1000))
    with pytest.raises(OptionError) as e:
        generate(model, tok, "Hi", draft_model=other)
    assert str(e.value) == ("the draft model's vocabulary has 1000 ids, the target's 151936; give a draft of the "
                            "same family and tokenizer")


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from qwen3_mlx.cli import commands as cli

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": 151700, "content": "<|zz|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})  # one id more
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    run = CliRunner().invoke(cli.main, ["generate", "--model", str(tiny_checkpoint), "-p", "Hi", "--draft-model",
                                        str(other), "-m", "2"])
    assert run.exit_code == 2 and run.stderr.splitlines()[-1] == (
        "Error: the draft model's tokenizer differs from the target's; give a draft of the same family")


def test_stats_count_drafted_and_accepted_tokens(tok):
    model = stub(tok, cycler(tok, " la di da"))
    looked = generate(model, tok, "sing la di da la di da", think=False, max_tokens=30, **GREEDY, **LOOKUP)
    # The cycle is in the prompt (though what follows it there is the end of the user's turn, which the
    # first drafts copy): most tokens come out of drafts.
    assert 15 <= looked.stats.accepted_tokens <= looked.stats.drafted_tokens
    assert len(looked.token_ids) == 30


# ---------------------------------------------------------------- the command line and the chat


def test_generate_drafts_from_the_command_line_and_shows_the_acceptance(tiny_checkpoint, tiny, tmp_path):
    from click.testing import CliRunner

    from qwen3_mlx.cli import commands as cli

    args = ["generate", "--model", str(tiny_checkpoint), "-p", "one two three one two three one two", "--no-think",
            "--temp", "0", "-m", "20", "-v"]
    plain = CliRunner().invoke(cli.main, args)
    looked = CliRunner().invoke(cli.main, [*args, "--prompt-lookup"])
    drafted = CliRunner().invoke(cli.main, [*args, "--draft-model", str(tiny_checkpoint)])
    assert plain.exit_code == looked.exit_code == drafted.exit_code == 0, drafted.output
    assert plain.stdout == looked.stdout == drafted.stdout
    assert "speculative:" not in plain.stderr
    assert "drafted tokens accepted (100%)" in drafted.stderr  # the model drafting for itself

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three one two three one two\nWhy is the sky blue?\nHi\n")
    args = ["generate", "--model", str(tiny_checkpoint), "--prompts-file", str(prompts), "--no-think", "--temp", "0",
            "-m", "12", "-v"]
    runs = [CliRunner().invoke(cli.main, [*args, *more]) for more in
            ([], ["--prompt-lookup"], ["--draft-model", str(tiny_checkpoint)])]
    assert [run.exit_code for run in runs] == [0, 0, 0], runs[2].output
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and len(runs[0].stdout.splitlines()) == 3
    assert "speculative:" not in runs[0].stderr
    assert "speculative: 27 of 27 drafted tokens accepted (100%)" in runs[2].stderr


def test_a_chat_drafts_every_turn(tiny):
    from qwen3_mlx.generation.chat import ChatSession
    from qwen3_mlx.generation.job import collect

    model, tok = tiny
    options = dict(think=False, max_tokens=12, **GREEDY)
    plain, drafted = ChatSession(model, tok, **options), ChatSession(model, tok, draft_model=model, **options)
    for text in ("Hi", "And then?"):
        a, b = collect(plain.send(text)), collect(drafted.send(text))
        assert a.token_ids == b.token_ids and b.stats.accepted_tokens == b.stats.drafted_tokens > 0
