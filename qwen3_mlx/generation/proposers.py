"""Speculative decoding's proposers: what guesses the next tokens cheaply, for the target to check
(verification.py). A proposer is a small object with one method, `propose(context, k, picker)`.

- PromptLookup: an n-gram of the text so far found earlier in the prompt or the text (vLLM's
  prompt_lookup_min/max); q is a point mass.
- DraftModel: a smaller model with its own cache, which follows the target's; q is its distribution
  under the request's own sampling parameters (its Picker's processors and filters, no grammar mask).
- BatchDraft: a draft model drafting for every row of a speculative batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..device import generation_stream
from ..errors import OptionError
from ..model.batch_cache import BatchRotatingKVCache
from ..model.cache import KVCache
from ..model.kv_quant import KVQuantization
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .caches import draft_cache
from .options import GenerationOptions
from .passes import extend_cache
from .picker import Picker


@dataclass
class Proposal:
    """Drafted tokens, and the proposer's distributions over them: (n, V) probabilities, or None when
    each draft is certain (a point mass, as prompt lookup's)."""

    tokens: list[int]
    q: mx.array | None = None


class PromptLookup:
    """Drafts what followed the latest earlier occurrence of the text's last n tokens (n from
    `max_n` down to `min_n`), in the prompt or the text so far. Costs nothing when nothing matches."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise OptionError(f"prompt_lookup_min ({min_n}) must be >= 1 and <= prompt_lookup_max ({max_n})")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, context: Sequence[int], k: int, picker: Picker) -> Proposal:
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            tail = list(context[-n:])
            for start in range(len(context) - n - 1, -1, -1):  # the latest occurrence first
                if list(context[start : start + n]) == tail:
                    follow = list(context[start + n : start + n + k])
                    if follow:
                        return Proposal(follow)
        return Proposal([])


class DraftModel:
    """A smaller model that drafts with its own cache. Its cache follows the target's: before each
    proposal it is trimmed to what it shares with the text and extended with the rest."""

    def __init__(self, model: Model, target: Model, quantization: KVQuantization | None = None) -> None:
        check_vocabulary(model, target)
        self.model = model
        self.cache: list[KVCache] = draft_cache(model, quantization)
        self.held: list[int] = []  # the tokens its cache holds

    def propose(self, context: Sequence[int], k: int, picker: Picker) -> Proposal:
        """k tokens drawn from the draft's distribution q, under the request's sampling parameters
        (its processors over the same history, its temperature and filters). The first pass takes in
        what the cache lacks of the text (its last token at least), as a batch's draft does (BatchDraft)."""
        if k == 0:
            return Proposal([])
        if not self.held:  # its first: the text but its last token first, as a batch's row joins (BatchDraft.add)
            extend_cache(self.model, self.cache, context[:-1])
            self.held = list(context[:-1])
        held = shared(self.held, context)
        for c in self.cache:
            c.trim(len(self.held) - held)
        feed, steps = list(context[held:]), DraftSteps(picker, context[-1])
        for _ in range(k):
            with generation_stream():
                logits = self.model.decode(mx.array([feed], mx.int32), self.cache)  # (1, V)
            feed = [steps.take(logits)]
        self.held = list(context) + steps.tokens[:-1]
        return steps.proposal()


def shared(held: Sequence[int], context: Sequence[int]) -> int:
    """How many of the tokens a draft's cache holds it keeps: those it shares with the text, but the
    text's last (the next pass feeds it)."""
    n = 0
    for a, b in zip(held, context[:-1]):
        if a != b:
            break
        n += 1
    return n


class DraftSteps:
    """One row's drafting: a token a pass drawn from q under the request's sampling parameters, with
    the history its processors see (the request's, its latest token, then its drafts)."""

    def __init__(self, picker: Picker, latest: int) -> None:
        self.picker = picker
        token = mx.array([latest], mx.int32)
        self.history = token if picker.history is None else mx.concatenate([picker.history, token])
        self.tokens: list[int] = []
        self._qs: list[mx.array] = []

    def take(self, logits: mx.array) -> int:
        """The next draft from this pass's logits (1, V)."""
        mx.eval(self.draw(logits))
        return self.read()

    def draw(self, logits: mx.array) -> list[mx.array]:
        """The next draft from this pass's logits (1, V), queued; its arrays, to evaluate before read().
        Each pass is evaluated before the next: a pipeline-split draft's stages must see each pass's
        collectives in order (a graph of k passes lets a rank schedule the next receive before this
        all_sum)."""
        with generation_stream():
            # No grammar mask: the matcher stands at the request's latest token, not at the drafts.
            q = self.picker.probabilities(self.picker.process(logits, self.history, mask=False))
            token = self.picker.sample_from(q, self.picker.next_key())
            self.history = mx.concatenate([self.history, token])
        self._qs.append(q)
        self._token = token
        return [token, q]

    def read(self) -> int:
        self.tokens.append(self._token.item())
        return self.tokens[-1]

    def proposal(self) -> Proposal:
        return Proposal(self.tokens, mx.stack(self._qs) if self._qs else None)


class BatchDraft:
    """A draft model drafting for every row of a speculative batch at once (batch_decode.BatchGenerator): one
    cache for all rows, in which each row follows its own text and takes back its own tokens
    (BatchRotatingKVCache without a window), and a pass of the batch a draft step, where DraftModel
    per row would take a pass a row. A row drafts what it drafts alone with DraftModel: the same
    passes' contents, the same draws."""

    def __init__(self, model: Model, target: Model, quantization: KVQuantization | None = None) -> None:
        check_vocabulary(model, target)
        self.model, self.quantization = model, quantization
        self.cache = [BatchRotatingKVCache(None, quantization) for _ in model.layers]
        self.held: list[list[int]] = []  # the tokens each row of its cache holds

    def add(self, prompt_ids: Sequence[int]) -> None:
        """A row joining the batch: its prompt computed by the draft (alone, then joined)."""
        cache = draft_cache(self.model, self.quantization)
        extend_cache(self.model, cache, prompt_ids)
        for batch, layer in zip(self.cache, cache):
            batch.add(layer)
        self.held.append(list(prompt_ids))

    def keep(self, rows: list[int]) -> None:
        for c in self.cache:
            c.keep(rows)
        self.held = [self.held[i] for i in rows]

    def propose(self, contexts: Sequence[Sequence[int]], ks: Sequence[int],
                pickers: Sequence[Picker]) -> list[Proposal]:
        """ks[i] drafts for row i after its text contexts[i] (0: none; its context is then not read)."""
        rows = [i for i, k in enumerate(ks) if k]
        if not rows:
            return [Proposal([]) for _ in ks]
        keep = [shared(self.held[i], contexts[i]) if ks[i] else len(self.held[i]) for i in range(len(ks))]
        self._trim([len(held) - n for held, n in zip(self.held, keep)])
        feeds = [list(contexts[i][keep[i] :]) if ks[i] else [] for i in range(len(ks))]
        steps = {i: DraftSteps(pickers[i], contexts[i][-1]) for i in rows}
        for step in range(max(ks)):
            width = max(len(f) for f in feeds)
            with generation_stream():
                logits = self.model(mx.array([f + [0] * (width - len(f)) for f in feeds], mx.int32), self.cache)
            self._trim([width - len(f) for f in feeds])  # the padding
            drawing = [i for i in rows if step < ks[i]]
            mx.eval([a for i in drawing for a in steps[i].draw(logits[i, len(feeds[i]) - 1 : len(feeds[i])])])
            drawn = {i: steps[i].read() for i in drawing}
            feeds = [[drawn[i]] if i in drawn and step + 1 < ks[i] else [] for i in range(len(ks))]
        for i in rows:
            self.held[i] = list(contexts[i]) + steps[i].tokens[:-1]
        return [steps[i].proposal() if i in steps else Proposal([]) for i in range(len(ks))]

    def _trim(self, counts: list[int]) -> None:
        """Each row's cache forgets its latest counts[i] tokens."""
        if any(counts):
            for c in self.cache:
                c.trim_rows(counts)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)



def make_proposer(model: Model, opts: GenerationOptions, draft_model: Model | None,
                  prompt_lookup: bool = False) -> PromptLookup | DraftModel | None:
    """The request's proposer, or None when it does not speculate (num_draft_tokens 0, or nothing asked):
    a draft model, or prompt lookup (the request's option, or the run's `prompt_lookup`)."""
    check_proposers(opts, draft_model)
    if not opts.num_draft_tokens or (draft_model is None and not (opts.prompt_lookup or prompt_lookup)):
        return None
    if draft_model is not None:
        return DraftModel(draft_model, model, opts.kv_quantization)
    return PromptLookup(opts.prompt_lookup_min, opts.prompt_lookup_max)


def check_vocabulary(draft: Model, target: Model) -> None:
    if draft.args.vocab_size != target.args.vocab_size:
        raise OptionError(f"the draft model's vocabulary has {draft.args.vocab_size} ids, the target's "
                          f"{target.args.vocab_size}; give a draft of the same family and tokenizer")


def check_proposers(opts: GenerationOptions, draft_model: Model | None) -> None:
    if draft_model is not None and opts.prompt_lookup:
        raise OptionError("prompt_lookup and a draft model exclude each other; give one")


def check_draft(tokenizer: Tokenizer, draft_tokenizer: Tokenizer) -> None:
    """A draft must read and write the same ids as the target."""
    if draft_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise OptionError("the draft model's tokenizer differs from the target's; give a draft of the same family")



__all__ = ["BatchDraft", "DraftModel", "PromptLookup", "Proposal", "check_draft", "check_proposers", "make_proposer"]
