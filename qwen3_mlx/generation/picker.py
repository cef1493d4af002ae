"""The one owner of logits -> token: a request's Picker applies its processors over its own tokens and
its grammar's mask (`process`), draws (`sample`, or `sample_from` a distribution) and reports
log-probabilities (`logprobs`). The single stream, a batch's rows, speculative verification and the
draft all call it, so no path can draw otherwise than the plain request would.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ..checkpoint.sampling_defaults import SamplingParams, default_params
from ..model.model import Model
from ..text.structured import GrammarState
from ..text.tokenizer import Tokenizer
from .options import GenerationOptions
from .response import TokenLogprob
from .sampling import Sampler, make_logits_processor, make_sampler, warp_logits

__all__ = ["Draw", "Picker", "make_picker"]

Processor = Callable[[mx.array, mx.array], mx.array]
Logprobs = tuple[mx.array, mx.array, mx.array]  # (1,) the token's, (k,) the top ids, (k,) their values


@dataclass
class Draw:
    """A drawn token, on the device until read: (1,) its id; with log-probabilities asked for, (1,)
    its log-probability and (k,) the ids and log-probabilities of the k most likely tokens."""

    token: mx.array
    logprobs: Logprobs | None = None

    def arrays(self) -> list[mx.array]:
        return [self.token, *(self.logprobs or ())]

    def read(self) -> tuple[int, TokenLogprob | None]:
        """The token id, and its TokenLogprob when asked for (waits for the device)."""
        token = self.token.item()
        if self.logprobs is None:
            return token, None
        chosen, top_ids, top_values = (a.tolist() for a in self.logprobs)
        top = sorted(zip(top_ids, top_values), key=lambda pair: -pair[1])
        return token, TokenLogprob(token, chosen[0], tuple(top))


class Picker:
    """How one request turns logits into a token, and what that depends on: its logits processors
    over the tokens it has been fed since the prompt (`history`), its grammar, its sampler, its random
    key (from its seed, split at every draw; without a seed, MLX's global random state), and the
    log-probabilities it reports (`top_logprobs`: how many of the most likely). A row of a batch picks
    with its own, so that its tokens never depend on the rows beside it. Its arrays are made at the
    first draw, in the thread that runs the model (an engine prepares requests in its callers' threads)."""

    def __init__(self, sampler: Sampler, processor: Processor | None = None, seed: int | None = None,
                 top_logprobs: int | None = None, vocab_limit: int | None = None,
                 grammar: GrammarState | None = None, params: SamplingParams | None = None) -> None:
        self.sampler, self.processor, self.seed = sampler, processor, seed
        self.top_logprobs, self.vocab_limit = top_logprobs, vocab_limit
        # Structured output: the mask needs the tokens so far on the host, so a constrained request
        # reads each token before its next draw is built; passes.step starts the model's step first,
        # so the mask is filled while it computes (benchmarks/structured_bench.py measures what is left).
        self.grammar = grammar
        self.params = params  # what sampler and processor were made from, if known
        self.key: mx.array | None = None
        self.history: mx.array | None = None  # every token fed after the prompt, for the penalties

    # ---------------------------------------------------------------- what a pick depends on

    def shared_key(self) -> tuple | None:
        """Rows of a batch whose picks are the same function of their own logits alone may pick
        together, in one operation: the same parameters, no penalties over their own tokens, no key
        of their own (or greedy), no grammar, no log-probabilities. Their key; None for the others."""
        p = self.params
        if p is None or self.grammar is not None or self.top_logprobs is not None:
            return None
        if p.presence_penalty != 0.0 or p.repetition_penalty != 1.0 or (self.seed is not None and p.temperature != 0):
            return None
        bias = tuple(sorted((p.logit_bias or {}).items()))
        return (p.temperature, p.top_p, p.top_k, p.min_p, bias, self.vocab_limit)

    @property
    def argmax_only(self) -> bool:
        """Its pick is the argmax of the logits over its vocabulary and nothing else: greedy, with no
        processor, grammar or log-probabilities (a speculative batch reads such rows' tokens at once)."""
        p = self.params
        return (p is not None and p.temperature == 0 and self.processor is None and self.grammar is None
                and self.top_logprobs is None)

    def remember(self, ids: mx.array) -> None:
        """Tokens fed to the model: the history and the grammar take them in."""
        if self.processor is not None:
            self.history = ids if self.history is None else mx.concatenate([self.history, ids])
        if self.grammar is not None:
            for token in ids.tolist():
                self.grammar.advance(token)

    def forget(self, n: int) -> None:
        """The latest n tokens remembered are taken back (drafts not kept)."""
        if self.history is not None:
            self.history = self.history[: self.history.shape[0] - n]
        if self.grammar is not None:
            self.grammar.rollback(n)

    def next_key(self) -> mx.array | None:
        """The key of the next draw: the request's own, split once a draw; None without a seed (MLX's
        global random state)."""
        if self.seed is None:
            return None
        self.key, key = mx.random.split(self.key if self.key is not None else mx.random.key(self.seed))
        return key

    # ---------------------------------------------------------------- logits -> token

    def process(self, logits: mx.array, history: mx.array | None, mask: bool = True) -> mx.array:
        """Logits (B, V) after the request's processors over `history` (n,) (None: no tokens yet) and,
        with `mask`, its grammar's mask, after every other processor (its matcher's state is the
        request's: a draft, ahead of it, leaves the mask out)."""
        if self.processor is not None:
            logits = self.processor(logits, history if history is not None else mx.zeros((0,), mx.int32))
        if mask and self.grammar is not None:
            logits = self.grammar.mask(logits)
        return logits

    def sample(self, logits: mx.array, key: mx.array | None) -> mx.array:
        """Token ids (B,) drawn from processed logits (B, V) by the request's sampler."""
        return self.sampler(logits, key)

    def probabilities(self, logits: mx.array) -> mx.array:
        """The distribution (V',) the sampler draws from, for processed logits (1, V): temperature and
        filters over the vocabulary; a one-hot argmax for greedy requests."""
        logits = logits[0, : self.vocab_limit]
        if self.params.temperature == 0:
            return (mx.arange(logits.shape[-1]) == mx.argmax(logits)).astype(mx.float32)
        return mx.softmax(warp_logits(logits[None], self.params), axis=-1)[0]

    def sample_from(self, p: mx.array, key: mx.array | None) -> mx.array:
        """A token (1,) from probabilities p (V,)."""
        if self.params.temperature == 0:
            return mx.argmax(p)[None].astype(mx.int32)
        return mx.random.categorical(mx.log(p)[None], key=key).astype(mx.int32)

    def logprobs(self, logits: mx.array, token: mx.array) -> Logprobs | None:
        """The log-probabilities of processed logits (1, V) over the vocabulary: token's (1,), and the
        ids and values of the `top_logprobs` most likely; None when not asked for."""
        if self.top_logprobs is None:
            return None
        logits = logits[:, : self.vocab_limit].astype(mx.float32)
        logprobs = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]  # (V,)
        k = min(self.top_logprobs, logprobs.shape[0])
        top = mx.argpartition(-logprobs, k - 1)[:k] if k else mx.zeros((0,), mx.int32)
        return logprobs[token], top, logprobs[top]

    def logprob(self, logits: mx.array, token: int) -> TokenLogprob | None:
        """A given token's TokenLogprob under processed logits (1, V), as `draw` reports it (waits)."""
        ids = mx.array([token], mx.int32)
        return Draw(ids, self.logprobs(logits, ids)).read()[1]

    def draw(self, logits: mx.array) -> Draw:
        """The next token of logits (1, V), queued, not waited for."""
        logits = self.process(logits, self.history)
        token = self.sample(logits, self.next_key())
        return Draw(token, self.logprobs(logits, token))


def make_picker(tokenizer: Tokenizer, model: Model, opts: GenerationOptions, thinking: bool) -> Picker:
    """How a request picks: the options' sampler and logits processor, with the mode's defaults and
    generation_config's, its seed's key, its log-probabilities."""
    params = default_params(thinking, tokenizer.generation_config, temperature=opts.temp, top_p=opts.top_p,
                            top_k=opts.top_k, min_p=opts.min_p, presence_penalty=opts.presence_penalty,
                            repetition_penalty=opts.repetition_penalty, logit_bias=opts.logit_bias)
    if params.temperature == 0 and thinking:
        warnings.warn("greedy decoding (temp 0) in thinking mode can repeat endlessly; "
                      "Qwen recommends temp 0.6, top-p 0.95, top-k 20", stacklevel=4)
    return Picker(make_sampler(params, tokenizer.vocab_size), make_logits_processor(params, model.args.vocab_size),
                  opts.seed, opts.logprobs, tokenizer.vocab_size, params=params)
