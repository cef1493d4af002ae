"""Perplexity: the token mean of transformers' own log-likelihoods on the same weights, over the windows
the rule gives (each token but a text's first scored once); only the assistant turns of a conversation
scored; windows in a batch as one at a time; a bad data file refused as FILE:LINE."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import Qwen3ForCausalLM

from checkpoints import make_checkpoint
from qwen3_mlx import perplexity
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.cli import commands
from qwen3_mlx.errors import OptionError
from qwen3_mlx.evaluation.documents import Document, make_document, read_texts
from qwen3_mlx.evaluation.perplexity import slide

TEXT = " ".join(f"Line {i}: the {['red', 'old', 'tall'][i % 3]} tree holds {i * 7 % 13} birds." for i in range(20))


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return Qwen3ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A checkpoint of 512 ids (fast to score; its texts are ids), loaded here and by transformers."""
    path = make_checkpoint(tmp_path_factory.mktemp("small"))
    return load_model(path), Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


IDS = np.random.default_rng(0).integers(0, 512, 150).tolist()


def hf_token_nll(hf, ids: list[int], context: int, stride: int) -> dict[int, float]:
    """Each target t's nll from transformers, read from the window the rule gives it: window (t-1)//S,
    which reads the `context` ids before its last target."""
    out, n = {}, len(ids)
    for t in range(1, n):
        last = min(((t - 1) // stride + 1) * stride, n - 1)
        start = max(0, last - context)
        out[t] = (start, last)
    logits = {}
    for start, last in set(out.values()):
        with torch.no_grad():
            logits[start, last] = torch.log_softmax(hf(torch.tensor([ids[start:last]])).logits[0].double(), -1)
    return {t: -logits[w][t - 1 - w[0], ids[t]].item() for t, w in out.items()}


@pytest.mark.parametrize("context,stride", [(64, 64), (64, 24), (40, 7)])
def test_perplexity_is_the_token_mean_of_transformers_nll_over_the_windows(small, tok, context, stride):
    model, hf = small
    assert len(IDS) > 2 * context  # a text longer than the context: several windows
    nll = hf_token_nll(hf, IDS, context, stride)
    result = perplexity(model, tok, [IDS], context=context, stride=stride)
    mean = sum(nll.values()) / len(nll)
    assert result.tokens == len(IDS) - 1
    assert result.nll == pytest.approx(mean, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean), rel=1e-5)


def test_a_context_longer_than_the_text_is_transformers_own_loss(small, tok):
    model, hf = small
    with torch.no_grad():
        loss = hf(torch.tensor([IDS]), labels=torch.tensor([IDS])).loss.item()
    result = perplexity(model, tok, [IDS], context=len(IDS) + 5)
    assert (result.tokens, result.nll) == (len(IDS) - 1, pytest.approx(loss, rel=1e-5))


def test_a_text_is_scored_as_its_token_ids(tiny):
    model, tokenizer = tiny
    text = TEXT[:100]
    assert perplexity(model, tokenizer, [text], context=16) == perplexity(model, tokenizer, [tokenizer.encode(text)],
                                                                           context=16)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 65, 100])
@pytest.mark.parametrize("context,stride", [(1, 1), (8, 8), (8, 3), (8, 1), (16, 5)])
def test_every_token_but_the_first_is_scored_once_with_up_to_context_before_it(n, context, stride):
    ids = list(range(n))  # an id is its position
    seen = []
    for w in slide(Document(ids, [i > 0 for i in ids]), context, stride):
        assert len(w.inputs) <= context and w.targets == [i + 1 for i in w.inputs]
        new = [t for t, c in zip(w.targets, w.counts) if c]
        assert new == list(range(new[0], new[-1] + 1))  # a run of new tokens, after every earlier one
        start = w.inputs[0]
        assert all(t - start == min(t, context) or t - start >= context - stride + 1 for t in new)
        assert new[-1] - start == min(new[-1], context)  # the last new token has the whole context
        seen += new
    assert seen == list(range(1, n))


def test_unscored_tokens_are_neither_counted_nor_computed():
    ids = list(range(30))
    scored = [10 <= i < 14 for i in ids]
    windows = list(slide(Document(ids, scored), 8, 4))
    assert [[t for t, c in zip(w.targets, w.counts) if c] for w in windows] == [[10, 11, 12], [13]]


def test_a_batch_of_windows_scores_as_one_at_a_time(small, tok):
    model, _ = small
    texts = [IDS, IDS[:40], IDS[:3], IDS[70:]]
    alone = perplexity(model, tok, texts, context=32, stride=12, batch_size=1)
    batched = perplexity(model, tok, texts, context=32, stride=12, batch_size=5)
    assert batched.tokens == alone.tokens == sum(len(t) - 1 for t in texts)
    assert batched.nll == pytest.approx(alone.nll, rel=1e-6)


CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
# The template's text, by hand, each piece marked scored or not: the assistant turns' content and <|im_end|>.
CONVERSATION_PIECES = [("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                       ("4<|im_end|>", True),
                       ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", False),
                       ("<think>\n\n</think>\n\nIt is 6.<|im_end|>", True), ("\n", False)]


def test_a_conversation_scores_only_its_assistant_turns(tiny, hf, tmp_path):
    model, tokenizer = tiny
    ids, mask = [], []
    for piece, scored in CONVERSATION_PIECES:
        piece_ids = tokenizer.encode(piece)
        ids, mask = ids + piece_ids, mask + [scored] * len(piece_ids)
    assert make_document(tokenizer, CONVERSATION) == Document(ids, mask)

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    result = perplexity(model, tokenizer, read_texts(data), context=8, stride=3)
    nll = hf_token_nll(hf, ids, 8, 3)
    counted = [nll[t] for t in range(1, len(ids)) if mask[t]]
    assert (result.tokens, result.nll) == (len(counted), pytest.approx(sum(counted) / len(counted), rel=1e-5))


def run(*args):
    return CliRunner().invoke(commands.main, ["perplexity", *map(str, args)])


def test_the_command_prints_the_functions_figures(tiny, tiny_checkpoint, tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": TEXT[:150]}) + "\n\n" + json.dumps({"messages": CONVERSATION}) + "\n")
    result = run("--model", tiny_checkpoint, "--data", data, "--context", 48, "--stride", 16, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    expected = perplexity(*tiny, [TEXT[:150], CONVERSATION], context=48, stride=16, batch_size=2)
    assert result.stdout == (f"perplexity {expected.perplexity:.4f} (nll {expected.nll:.4f} over "
                             f"{expected.tokens} tokens)\n")
    assert "scoring" in result.stderr


def test_a_text_file_is_one_text(tiny, tmp_path):
    data = tmp_path / "wiki.txt"
    data.write_text("{not json}\n" + TEXT + "\n\n" + TEXT)
    assert read_texts(data) == [data.read_text()]


BAD_LINES = [
    ("{oops", 'not JSON (Expecting property name enclosed in double quotes at column 2)'),
    ('{"txt": "a"}', 'expected a JSON object with a "text" string or a "messages" list, not both'),
    ('{"text": "a", "messages": []}', 'expected a JSON object with a "text" string or a "messages" list'),
    ('{"text": 3}', '"text" must be a non-empty string'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "the conversation has no assistant turn"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role='wizard' is not one of"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_a_bad_line_is_refused_by_file_and_line(tiny_checkpoint, tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n' + line + "\n")
    result = run("--model", tiny_checkpoint, "--data", data)
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {data}:3: {message}"), result.stderr


def test_an_empty_file_and_a_stride_past_the_context_are_refused(tiny_checkpoint, tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("\n  \n")
    result = run("--model", tiny_checkpoint, "--data", data)
    assert (result.exit_code, result.stderr) == (1, f"error: {data}: no text; give a text file, or JSON lines "
                                                    "with a text or messages field\n")
    data.write_text(TEXT)
    result = run("--model", tiny_checkpoint, "--data", data, "--context", 8, "--stride", 9)
    assert result.exit_code == 2 and "--stride 9 is larger than --context 8" in result.stderr


def test_bounds_and_foreign_ids_are_refused(tiny, tok):
    model, tokenizer = tiny
    with pytest.raises(OptionError, match="stride between 1 and context"):
        perplexity(model, tokenizer, [TEXT], context=4, stride=0)
    small = SimpleNamespace(args=SimpleNamespace(vocab_size=64))  # a model that knows fewer ids than the tokenizer
    with pytest.raises(OptionError, match=re.escape("outside the model's vocabulary [0, 64)")):
        perplexity(small, tok, [TEXT], context=4)
