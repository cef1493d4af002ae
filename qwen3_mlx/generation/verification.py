"""Speculative decoding's verification: the target checks a proposer's drafts (proposers.py) in one
forward pass, and speculative sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the text's
distribution exactly the target's alone.

- accept(): the acceptance rule over the target's distributions p and the proposer's q: a drafted token
  is kept with probability min(1, p/q); at the first rejection the token is drawn from
  normalize(max(0, p - q)); when every draft is kept, one more from p. Greedy requests keep a draft
  exactly when it is the target's argmax, so they give the target's tokens.
- DraftLength: the request's adaptive k (grows while drafts are kept, shrinks while they are not, and
  rests a while after drafts that keep failing).
- Speculation: one request's drafts, checked and settled, for either loop.
- SpeculativeGenerator: the single-stream loop's generator (single.py), one verification a step.

What is exact: greedy tokens equal the plain loop's wherever the top two logits are further apart than
the difference between a k+1-position pass and the compiled one-token step (last bits in float32; the
steps with no draft use the compiled step itself). Seeded sampling is repeatable; its draws are not the
plain loop's (the key is used in another order), its distribution is.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..device import generation_stream
from ..model.cache import KVCache
from ..model.model import Model
from .passes import Progress, prefill, step
from .picker import Draw, Picker
from .proposers import BatchDraft, DraftModel, PromptLookup, Proposal
from .response import TokenLogprob


def accept(picker: Picker, drafts: list[int], p: mx.array, q: mx.array | None,
           key: mx.array | None) -> tuple[int, mx.array]:
    """How many drafts are kept, and the token after them (1,).

    Args:
        drafts: n drafted tokens.
        p: (n + 1, V) the target's distributions after each prefix of the drafts.
        q: (n, V) the proposer's distributions, or None for point masses at the drafts.
    """
    n = len(drafts)
    ids = mx.array(drafts, mx.int32)
    rows = mx.arange(n)
    greedy = picker.params.temperature == 0
    keys = mx.random.split(key) if key is not None else (None, None)
    if n:
        p_drafts = p[rows, ids]
        q_drafts = q[rows, ids] if q is not None else mx.ones((n,))
        if greedy:  # exact: keep a draft only where it is the target's argmax
            keep = p_drafts > 0.5
        else:
            keep = mx.random.uniform(shape=(n,), key=keys[0]) * q_drafts < p_drafts
        rejected = [i for i, k in enumerate(keep.tolist()) if not k]
        kept = rejected[0] if rejected else n
    else:
        kept = 0
    if kept == n:
        return n, picker.sample_from(p[n], keys[1])
    residual = p[kept] - (q[kept] if q is not None else (mx.arange(p.shape[-1]) == drafts[kept]))
    residual = mx.maximum(residual, 0)
    total = residual.sum()
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[kept])
    return kept, picker.sample_from(residual, keys[1])


class DraftLength:
    """A request's draft length: up to `most`; one more after a step that kept every draft, the kept
    count plus one after one that did not; after `patience` steps in a row that kept none, no drafts
    for `rest` steps (plain decoding), then one again."""

    def __init__(self, most: int, patience: int = 4, rest: int = 16) -> None:
        self.most, self.patience, self.rest = most, patience, rest
        self.k = min(2, most)
        self._misses = self._resting = 0

    def next(self) -> int:
        if self._resting:
            self._resting -= 1
            return 0
        return self.k

    def update(self, drafted: int, kept: int) -> None:
        if not drafted:
            return
        self.k = min(self.most, self.k + 1) if kept == drafted else max(1, kept + 1)
        self._misses = self._misses + 1 if kept == 0 else 0
        if self._misses >= self.patience:
            self._misses, self._resting, self.k = 0, self.rest, 1


# ---------------------------------------------------------------- one request's speculation


class Speculation:
    """One request's speculation, for either loop (the single-stream generator below, a batch's row in
    batch.py), around the loop's own forward pass: `draft()` the tokens to check after the latest one,
    `settle()` the pass's logits into the tokens kept, `take_back()` what the caller did not use.

    `context` is every token so far: the prompt, the tokens given out, forced ones; its last is the
    latest token, which the next pass feeds (it is not in the cache yet)."""

    def __init__(self, picker: Picker, proposer: PromptLookup | DraftModel | BatchDraft, most: int,
                 prompt_ids: Sequence[int]) -> None:
        self.picker, self.proposer = picker, proposer
        self.length = DraftLength(most)
        self.context = list(prompt_ids)
        self.drafted = self.accepted = 0

    def draft(self, proposal: Proposal | None = None) -> Proposal:
        """The drafts to feed after the latest token, which is remembered now (the history and the
        grammar take it in); cut at the first draft the grammar refuses. `proposal`: drafted for it
        already, of length `length.next()` (a batch's BatchDraft drafts for every row at once)."""
        if proposal is None:
            k = self.length.next()
            proposal = self.proposer.propose(self.context, k, self.picker) if k else Proposal([])
        picker = self.picker
        picker.remember(mx.array(self.context[-1:], mx.int32))
        if picker.grammar is not None and proposal.tokens:
            n = picker.grammar.valid_prefix(proposal.tokens)
            proposal = Proposal(proposal.tokens[:n], proposal.q[:n] if proposal.q is not None and n else None)
        return proposal

    def settle(self, logits: mx.array, proposal: Proposal, argmax: list[int] | None = None) -> tuple[list[Given], int]:
        """The tokens given out after a pass over the latest token and the drafts, whose logits are
        (n + 1, V): the drafts kept and the token after them, with their log-probabilities; and how
        many fed drafts were not kept (the caller takes them out of its cache). `argmax`: the
        logits' argmax over the vocabulary at each position, when the caller has them and the
        request's picks are that alone (Picker.argmax_only): read from them, with no wait."""
        picker, drafts = self.picker, proposal.tokens
        if argmax is not None and picker.argmax_only:
            kept = next((i for i, t in enumerate(drafts) if argmax[i] != t), len(drafts))
            return self._kept(drafts, kept, argmax[kept], [None] * (kept + 1))
        if not drafts:  # the plain loop's own draw
            token, logprob = picker.draw(logits[-1:]).read()
            return self._kept(drafts, 0, token, [logprob])
        processed = self._processed(logits, drafts)
        p = mx.stack([picker.probabilities(row) for row in processed])  # (n + 1, V)
        kept, token = accept(picker, drafts, p, proposal.q, picker.next_key())
        tokens = drafts[:kept] + [token.item()]
        return self._kept(drafts, kept, tokens[-1], [picker.logprob(processed[i], t) for i, t in enumerate(tokens)])

    def _kept(self, drafts: list[int], kept: int, token: int, logprobs: list) -> tuple[list[Given], int]:
        """The first `kept` drafts and `token` after them given out."""
        if not drafts:
            self.context.append(token)
            return [(token, logprobs[0])], 0
        tokens = drafts[:kept] + [token]
        unkept = len(drafts) - kept
        self.picker.forget(unkept)
        self.drafted += len(drafts)
        self.accepted += kept
        self.length.update(len(drafts), kept)
        self.context += tokens
        return list(zip(tokens, logprobs)), unkept

    def take_back(self, unused: int) -> None:
        """The caller did not use the latest `unused` tokens given out (the response ended, or forced
        text in, before them): forgotten, as the cache holding the fed ones must forget them."""
        if unused > 0:
            self.picker.forget(unused)
            del self.context[len(self.context) - unused :]

    def _processed(self, logits: mx.array, drafts: list[int]) -> list[mx.array]:
        """The logits of each position (1, V) after the request's processors and grammar, the grammar
        and history advanced through the drafts (and left there: Picker.forget takes back the unkept)."""
        picker, out = self.picker, []
        for i in range(len(drafts) + 1):
            out.append(picker.process(logits[i : i + 1], picker.history))
            if i < len(drafts):
                picker.remember(mx.array([drafts[i]], mx.int32))
        return out


Given = tuple[int, "TokenLogprob | None"]  # a token given out, with its log-probabilities when asked for


# ---------------------------------------------------------------- the single-stream generator


class SpeculativeGenerator:
    """Token ids for one request, several a step: TokenGenerator's protocol (prefill, feed) with
    `next_tokens()` in place of `next_token()`, and `keep(n)` to take back what the caller did not use."""

    def __init__(self, model: Model, cache: list[KVCache], picker: Picker, proposer: PromptLookup | DraftModel,
                 most: int, prompt_ids: Sequence[int]) -> None:
        self.model, self.cache, self.picker = model, cache, picker
        self.spec = Speculation(picker, proposer, most, prompt_ids)
        self._pending: Draw | None = None  # the first draw after a prefill or forced tokens
        self._given = 0  # how many tokens the latest step gave out

    @property
    def drafted(self) -> int:
        return self.spec.drafted

    @property
    def accepted(self) -> int:
        return self.spec.accepted

    def prefill(self, ids: Sequence[int], step_size: int = 2048, progress: Progress | None = None) -> None:
        self._pending = prefill(self.model, self.cache, self.picker, ids, step_size, progress)

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` next (after the latest token), in one pass; drawing resumes after them."""
        context = self.spec.context
        fed = ([] if self._pending is not None else context[-1:]) + list(ids)
        self._pending = step(self.model, self.cache, self.picker, mx.array(fed, mx.int32))
        context += list(ids)
        self._given = 0

    def next_tokens(self) -> list[Given]:
        """The next tokens: the draws kept of this step's drafts, then the one after them."""
        if self._pending is not None:
            token, logprob = self._pending.read()
            self._pending = None
            self.spec.context.append(token)
            self._given = 1
            return [(token, logprob)]
        proposal = self.spec.draft()
        with generation_stream():
            fed = mx.array([self.spec.context[-1:] + proposal.tokens], mx.int32)
            # No drafts: the plain loop's compiled one-token step.
            logits = (self.model.decode(fed, self.cache) if not proposal.tokens else self.model(fed, self.cache)[0])
        tokens, unkept = self.spec.settle(logits, proposal)
        for c in self.cache:
            c.trim(unkept)
        self._given = len(tokens)
        return tokens

    def keep(self, used: int) -> None:
        """The caller used the first `used` (>= 1) of the latest tokens: take the rest back (the cache
        holds those before the new latest one: the unused were fed as drafts)."""
        unused = self._given - used
        if unused > 0:
            for c in self.cache:
                c.trim(unused)
            self.spec.take_back(unused)
            self._given = used



__all__ = ["DraftLength", "Given", "Speculation", "SpeculativeGenerator", "accept"]
