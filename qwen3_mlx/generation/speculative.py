"""Speculative decoding: a proposer guesses the next tokens cheaply, the target checks them all in one
forward pass, and speculative sampling (Leviathan et al. 2023; Chen et al. 2023) keeps the text's
distribution exactly the target's alone.

- Proposers: PromptLookup (an n-gram of the text so far found earlier in the prompt or the text, vLLM's
  prompt_lookup_min/max; q is a point mass) and DraftModel (a smaller model with its own cache, which
  follows the target's; q is its distribution under the request's own sampling parameters).
- accept(): the acceptance rule over the target's distributions p and the proposer's q: a drafted token
  is kept with probability min(1, p/q); at the first rejection the token is drawn from
  normalize(max(0, p - q)); when every draft is kept, one more from p. Greedy requests keep a draft
  exactly when it is the target's argmax, so they give the target's tokens.
- DraftLength: the request's adaptive k (grows while drafts are kept, shrinks while they are not, and
  rests a while after drafts that keep failing).
- SpeculativeGenerator: the single-stream loop's generator (generation.py), one verification a step.

What is exact: greedy tokens equal the plain loop's wherever the top two logits are further apart than
the difference between a k+1-position pass and the compiled one-token step (last bits in float32; the
steps with no draft use the compiled step itself). Seeded sampling is repeatable; its draws are not the
plain loop's (the key is used in another order), its distribution is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from ..device import generation_stream
from ..errors import OptionError
from ..model.batch_cache import BatchRotatingKVCache
from ..model.cache import KVCache
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .options import GenerationOptions
from .request import (
    Draw,
    DrawState,
    Progress,
    extend_cache,
    make_draw_state,
    prefill,
    step,
)
from .response import TokenLogprob
from .sampling import warp_logits

# ---------------------------------------------------------------- proposers


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

    def propose(self, context: Sequence[int], k: int, draws: DrawState) -> Proposal:
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

    def __init__(self, model: Model, target: Model) -> None:
        check_vocabulary(model, target)
        self.model = model
        self.cache: list[KVCache] = model.make_cache()
        self.held: list[int] = []  # the tokens its cache holds

    def propose(self, context: Sequence[int], k: int, draws: DrawState) -> Proposal:
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
        feed, steps = list(context[held:]), DraftSteps(draws, context[-1])
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

    def __init__(self, draws: DrawState, latest: int) -> None:
        self.draws = draws
        token = mx.array([latest], mx.int32)
        self.history = token if draws.history is None else mx.concatenate([draws.history, token])
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
            q = distribution(self.draws, logits, self.history)
            token = sample(self.draws, q, self.draws.next_key())
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
    """A draft model drafting for every row of a speculative batch at once (batch.BatchGenerator): one
    cache for all rows, in which each row follows its own text and takes back its own tokens
    (BatchRotatingKVCache without a window), and a pass of the batch a draft step, where DraftModel
    per row would take a pass a row. A row drafts what it drafts alone with DraftModel: the same
    passes' contents, the same draws."""

    def __init__(self, model: Model, target: Model) -> None:
        check_vocabulary(model, target)
        self.model = model
        self.cache = [BatchRotatingKVCache(None) for _ in model.layers]
        self.held: list[list[int]] = []  # the tokens each row of its cache holds

    def add(self, prompt_ids: Sequence[int]) -> None:
        """A row joining the batch: its prompt computed by the draft (alone, then joined)."""
        cache = self.model.make_cache()
        extend_cache(self.model, cache, prompt_ids)
        for batch, layer in zip(self.cache, cache):
            batch.add(layer)
        self.held.append(list(prompt_ids))

    def keep(self, rows: list[int]) -> None:
        for c in self.cache:
            c.keep(rows)
        self.held = [self.held[i] for i in rows]

    def propose(self, contexts: Sequence[Sequence[int]], ks: Sequence[int],
                draws: Sequence[DrawState]) -> list[Proposal]:
        """ks[i] drafts for row i after its text contexts[i] (0: none; its context is then not read)."""
        rows = [i for i, k in enumerate(ks) if k]
        if not rows:
            return [Proposal([]) for _ in ks]
        keep = [shared(self.held[i], contexts[i]) if ks[i] else len(self.held[i]) for i in range(len(ks))]
        self._trim([len(held) - n for held, n in zip(self.held, keep)])
        feeds = [list(contexts[i][keep[i] :]) if ks[i] else [] for i in range(len(ks))]
        steps = {i: DraftSteps(draws[i], contexts[i][-1]) for i in rows}
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


# ---------------------------------------------------------------- distributions and acceptance


def distribution(draws: DrawState, logits: mx.array, history: mx.array | None) -> mx.array:
    """The request's distribution (V,) for logits (1, V): its processors over `history`, then
    temperature and filters; a one-hot argmax for greedy requests. (The grammar's mask, when any, is
    applied by the caller, which knows the matcher's state.)"""
    if draws.processor is not None:
        logits = draws.processor(logits, history if history is not None else mx.zeros((0,), mx.int32))
    return probabilities(draws, logits)


def probabilities(draws: DrawState, logits: mx.array) -> mx.array:
    logits = logits[0, : draws.vocab_limit]
    params = draws.params
    if params.temperature == 0:
        return (mx.arange(logits.shape[-1]) == mx.argmax(logits)).astype(mx.float32)
    return mx.softmax(warp_logits(logits[None], params), axis=-1)[0]


def sample(draws: DrawState, p: mx.array, key: mx.array | None) -> mx.array:
    """A token (1,) from probabilities p (V,)."""
    if draws.params.temperature == 0:
        return mx.argmax(p)[None].astype(mx.int32)
    return mx.random.categorical(mx.log(p)[None], key=key).astype(mx.int32)


def accept(draws: DrawState, drafts: list[int], p: mx.array, q: mx.array | None,
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
    greedy = draws.params.temperature == 0
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
        return n, sample(draws, p[n], keys[1])
    residual = p[kept] - (q[kept] if q is not None else (mx.arange(p.shape[-1]) == drafts[kept]))
    residual = mx.maximum(residual, 0)
    total = residual.sum()
    residual = mx.where(total > 0, residual / mx.maximum(total, 1e-30), p[kept])
    return kept, sample(draws, residual, keys[1])


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

    def __init__(self, draws: DrawState, proposer: PromptLookup | DraftModel | BatchDraft, most: int,
                 prompt_ids: Sequence[int]) -> None:
        self.draws, self.proposer = draws, proposer
        self.length = DraftLength(most)
        self.context = list(prompt_ids)
        self.drafted = self.accepted = 0

    def draft(self, proposal: Proposal | None = None) -> Proposal:
        """The drafts to feed after the latest token, which is remembered now (the history and the
        grammar take it in); cut at the first draft the grammar refuses. `proposal`: drafted for it
        already, of length `length.next()` (a batch's BatchDraft drafts for every row at once)."""
        if proposal is None:
            k = self.length.next()
            proposal = self.proposer.propose(self.context, k, self.draws) if k else Proposal([])
        draws = self.draws
        draws.remember(mx.array(self.context[-1:], mx.int32))
        if draws.grammar is not None and proposal.tokens:
            n = draws.grammar.valid_prefix(proposal.tokens)
            proposal = Proposal(proposal.tokens[:n], proposal.q[:n] if proposal.q is not None and n else None)
        return proposal

    def settle(self, logits: mx.array, proposal: Proposal, argmax: list[int] | None = None) -> tuple[list[Given], int]:
        """The tokens given out after a pass over the latest token and the drafts, whose logits are
        (n + 1, V): the drafts kept and the token after them, with their log-probabilities; and how
        many fed drafts were not kept (the caller takes them out of its cache). `argmax`: the
        logits' argmax over the vocabulary at each position, when the caller has them and the
        request's draws are that alone (DrawState.argmax_only): read from them, with no wait."""
        draws, drafts = self.draws, proposal.tokens
        if argmax is not None and draws.argmax_only:
            kept = next((i for i, t in enumerate(drafts) if argmax[i] != t), len(drafts))
            return self._kept(drafts, kept, argmax[kept], [None] * (kept + 1))
        if not drafts:  # the plain loop's own draw
            token, logprob = draws.draw(logits[-1:]).read()
            return self._kept(drafts, 0, token, [logprob])
        processed = self._processed(logits, drafts)
        p = mx.stack([probabilities(draws, row) for row in processed])  # (n + 1, V)
        kept, token = accept(draws, drafts, p, proposal.q, draws.next_key())
        tokens = drafts[:kept] + [token.item()]
        return self._kept(drafts, kept, tokens[-1], [_logprob(draws, processed[i], t) for i, t in enumerate(tokens)])

    def _kept(self, drafts: list[int], kept: int, token: int, logprobs: list) -> tuple[list[Given], int]:
        """The first `kept` drafts and `token` after them given out."""
        if not drafts:
            self.context.append(token)
            return [(token, logprobs[0])], 0
        tokens = drafts[:kept] + [token]
        unkept = len(drafts) - kept
        self._forget(unkept)
        self.drafted += len(drafts)
        self.accepted += kept
        self.length.update(len(drafts), kept)
        self.context += tokens
        return list(zip(tokens, logprobs)), unkept

    def take_back(self, unused: int) -> None:
        """The caller did not use the latest `unused` tokens given out (the response ended, or forced
        text in, before them): forgotten, as the cache holding the fed ones must forget them."""
        if unused > 0:
            self._forget(unused)
            del self.context[len(self.context) - unused :]

    def _forget(self, n: int) -> None:
        draws = self.draws
        if draws.history is not None:
            draws.history = draws.history[: draws.history.shape[0] - n]
        if draws.grammar is not None:
            draws.grammar.rollback(n)

    def _processed(self, logits: mx.array, drafts: list[int]) -> list[mx.array]:
        """The logits of each position (1, V) after the request's processors and grammar, the grammar
        and history advanced through the drafts (and left there: _forget takes back the unkept)."""
        draws, out = self.draws, []
        for i in range(len(drafts) + 1):
            row = logits[i : i + 1]
            if draws.processor is not None:
                history = draws.history if draws.history is not None else mx.zeros((0,), mx.int32)
                row = draws.processor(row, history)
            if draws.grammar is not None:
                row = draws.grammar.mask(row)
            out.append(row)
            if i < len(drafts):
                draws.remember(mx.array([drafts[i]], mx.int32))
        return out


Given = tuple[int, "TokenLogprob | None"]  # a token given out, with its log-probabilities when asked for


# ---------------------------------------------------------------- the single-stream generator


class SpeculativeGenerator:
    """Token ids for one request, several a step: TokenGenerator's protocol (prefill, feed) with
    `next_tokens()` in place of `next_token()`, and `keep(n)` to take back what the caller did not use."""

    def __init__(self, model: Model, cache: list[KVCache], draws: DrawState, proposer: PromptLookup | DraftModel,
                 most: int, prompt_ids: Sequence[int]) -> None:
        self.model, self.cache, self.draws = model, cache, draws
        self.spec = Speculation(draws, proposer, most, prompt_ids)
        self._pending: Draw | None = None  # the first draw after a prefill or forced tokens
        self._given = 0  # how many tokens the latest step gave out

    @property
    def drafted(self) -> int:
        return self.spec.drafted

    @property
    def accepted(self) -> int:
        return self.spec.accepted

    def prefill(self, ids: Sequence[int], step_size: int = 2048, progress: Progress | None = None) -> None:
        self._pending = prefill(self.model, self.cache, self.draws, ids, step_size, progress)

    def feed(self, ids: Sequence[int]) -> None:
        """Force `ids` next (after the latest token), in one pass; drawing resumes after them."""
        context = self.spec.context
        fed = ([] if self._pending is not None else context[-1:]) + list(ids)
        self._pending = step(self.model, self.cache, self.draws, mx.array(fed, mx.int32))
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


def _logprob(draws: DrawState, logits: mx.array, token: int) -> TokenLogprob | None:
    """The token's log-probability under `logits` (1, V), as DrawState.draw reports it."""
    if draws.logprobs is None:
        return None
    row = logits[0, : draws.vocab_limit].astype(mx.float32)
    logprobs = row - mx.logsumexp(row)
    k = min(draws.logprobs, logprobs.shape[0])
    top = mx.argpartition(-logprobs, k - 1)[:k] if k else mx.zeros((0,), mx.int32)
    values = logprobs[top].tolist() if k else []
    pairs = sorted(zip(top.tolist() if k else [], values), key=lambda pair: -pair[1])
    return TokenLogprob(token, logprobs[token].item(), tuple(pairs))


def make_proposer(model: Model, opts: GenerationOptions, draft_model: Model | None,
                  prompt_lookup: bool = False) -> PromptLookup | DraftModel | None:
    """The request's proposer, or None when it does not speculate (num_draft_tokens 0, or nothing asked):
    a draft model, or prompt lookup (the request's option, or the run's `prompt_lookup`)."""
    check_proposers(opts, draft_model)
    if not opts.num_draft_tokens or (draft_model is None and not (opts.prompt_lookup or prompt_lookup)):
        return None
    if draft_model is not None:
        return DraftModel(draft_model, model)
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


__all__ = ["DraftLength", "DraftModel", "PromptLookup", "Proposal", "Speculation", "SpeculativeGenerator", "accept",
           "check_draft", "distribution", "make_draw_state", "make_proposer", "probabilities"]
