"""One owner of logits -> token: the single stream, a batch's rows (alone and drawn together), speculative
verification and the draft each process the same logits, after the same tokens, into the same
distribution, bit for bit (they all call the request's Picker)."""

import json
from types import SimpleNamespace

import mlx.core as mx
import pytest

from qwen3_mlx.generation.batch_decode import BatchGenerator, Row
from qwen3_mlx.generation.options import GenerationOptions
from qwen3_mlx.generation.passes import step
from qwen3_mlx.generation.picker import Draw, Picker, make_picker
from qwen3_mlx.generation.proposers import DraftModel, PromptLookup, Proposal
from qwen3_mlx.generation.verification import Speculation
from qwen3_mlx.model.cache import KVCache
from qwen3_mlx.text.structured import constraint_state

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CASES = {
    "greedy": dict(temp=0.0),
    "temperature and filters": dict(temp=0.8, top_k=20, top_p=0.9, min_p=0.05),
    "penalties": dict(temp=0.8, top_k=50, presence_penalty=1.5, repetition_penalty=1.3),
    "logit bias": dict(temp=0.8, top_p=0.95, logit_bias={7: 5.0, 9: float("-inf"), 13: -2.5}),
    "grammar": dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, json_schema=SCHEMA),
}


class FixedLogits:
    """A model whose every position's logits are `rows[i]` at the i-th position fed in a call (the last
    row past them); it keeps a real KVCache of dummy entries, so caches join, trim and roll back."""

    layers = [None]
    dtype = mx.float32

    def __init__(self, rows: mx.array) -> None:
        self.rows = rows  # (n, V)
        self.args = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096)

    def make_cache(self, max_kv_size=None, keep=0, quantization=None):
        return [KVCache()]

    def __call__(self, ids, cache):
        b, n = ids.shape
        if cache[0].__class__ is KVCache:
            cache[0].update_and_fetch(mx.zeros((b, 1, n, 2)), mx.zeros((b, 1, n, 2)))
        at = mx.minimum(mx.arange(n), self.rows.shape[0] - 1)
        return mx.broadcast_to(self.rows[at][None], (b, n, VOCAB))

    def decode(self, ids, cache):
        return self(ids[:, -1:], cache)[:, -1, :]


@pytest.fixture(scope="module")
def logits():
    return mx.random.normal((2, VOCAB), key=mx.random.key(27)) * 4  # a position, and the one after a draft


def fresh(tok, case: str, history: list[int]) -> Picker:
    """A request's Picker after `history`, as prepare() makes it (the grammar as the request's)."""
    options = GenerationOptions(think=False, **CASES[case])
    picker = make_picker(tok, FixedLogits(mx.zeros((1, VOCAB))), options, thinking=False)
    if options.json_schema is not None:
        picker.grammar = constraint_state(tok, VOCAB, json_schema=options.json_schema, regex=None, grammar=None,
                                          thinking=False, in_reasoning=False)
    picker.remember(mx.array(history, mx.int32))
    return picker


def recording(monkeypatch) -> list:
    """Every Picker.process's output, in order."""
    seen, process = [], Picker.process

    def record(self, logits, history, mask=True):
        out = process(self, logits, history, mask)
        seen.append(out)
        return out

    monkeypatch.setattr(Picker, "process", record)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_the_four_draw_paths_process_the_same_logits_into_the_same_distribution(tok, logits, case, monkeypatch):
    ids = tok.encode(json.dumps({"name": "Alice"})[:11])  # '{"name": "A': a prefix the schema allows
    prompt, history, latest = [1, 2, 3], ids[:-1], ids[-1]
    draft = tok.encode("x")[0]
    seen = recording(monkeypatch)
    model = FixedLogits(logits)

    # The single stream: the draw after the latest token (passes.step, as TokenGenerator runs it).
    single = fresh(tok, case, history)
    step(model, model.make_cache(), single, mx.array([latest], mx.int32))
    (alone,) = seen

    # A batch of two rows, each after the latest token: drawn alone, or together when they may.
    gen = BatchGenerator(FixedLogits(logits[:1]))
    pickers = [fresh(tok, case, history) for _ in range(2)]
    for picker in pickers:
        cache = model.make_cache()
        model(mx.array([prompt]), cache)
        gen.add(Row(SimpleNamespace(draws=picker, prompt_ids=prompt), Draw(mx.array([latest], mx.int32))), cache)
    del seen[:]
    gen.step()
    batched = list(seen) if len(seen) == 2 else [seen[0][i : i + 1] for i in range(2)]
    assert (len(seen) == 1) == (pickers[0].shared_key() is not None)

    # Speculative verification: the latest token and one draft checked in one pass (position 0 compared).
    verifier = fresh(tok, case, history)
    spec = Speculation(verifier, PromptLookup(), 4, prompt + history + [latest])
    del seen[:]
    spec.settle(logits, spec.draft(Proposal([draft], None)))
    verified = seen[0]

    # The draft: a draft model's distribution q after the same tokens (no grammar mask: see Picker.process).
    drafter = fresh(tok, case, history)
    q = DraftModel(model, model).propose(prompt + history + [latest], 1, drafter).q[0]

    p = single.probabilities(alone)
    for other in [*batched, verified]:
        assert mx.array_equal(other, alone).item()
        assert mx.array_equal(single.probabilities(other), p).item()
    if single.grammar is None:
        assert mx.array_equal(q, p).item()
    else:  # the mask left out, the rest the same
        unmasked = fresh(tok, case, history)
        unmasked.remember(mx.array([latest], mx.int32))
        assert mx.array_equal(q, unmasked.probabilities(unmasked.process(logits[:1], unmasked.history, mask=False))).item()
        assert not mx.array_equal(q, p).item()
    assert (p > 0).sum().item() >= 1 and abs(p.sum().item() - 1) < 1e-4


def test_log_probabilities_of_a_verified_token_are_those_of_its_draw(tok, logits):
    picker = fresh(tok, "penalties", [5, 6, 5])
    picker.top_logprobs = 4
    processed = picker.process(logits[:1], picker.history)
    token, drawn = Draw(mx.array([11], mx.int32), picker.logprobs(processed, mx.array([11], mx.int32))).read()
    assert picker.logprob(processed, token) == drawn and len(drawn.top) == 4
