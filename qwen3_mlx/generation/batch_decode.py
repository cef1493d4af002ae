"""Batched decoding: token ids for many rows. A decode step runs every row's next token through the
model as one batch (B, 1) over a BatchKVCache; each row draws from its own logits with its own Picker
(processors over its own tokens, its own key), so its tokens never depend on its neighbours. The
thinking budget's forced text goes into its row one token a step, while the other rows keep sampling.
Rows join (`add`) and leave (`remove`) between steps; scheduler.py decides which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..device import generation_stream
from ..model.batch_cache import BatchKVCache, BatchRotatingKVCache
from ..model.cache import KVCache
from ..model.kv_quant import KVQuantization, Packed
from ..model.model import Model
from .picker import Draw
from .proposers import BatchDraft, Proposal
from .job import Job
from .verification import Given, Speculation


@dataclass(eq=False)
class Row:
    """One request's place in a batch."""

    job: Job
    draw: Draw  # its latest draw
    forced: list[int] = field(default_factory=list)  # ids to feed, one a step, in place of draws
    discard: int = 0  # how many of its coming draws come before its forced ids were taken in: not read
    read: bool = False  # its latest draw was read already (a newcomer's first, read as it joined)
    # A speculative batch's row: its speculation (None: it does not draft), and its latest token, read
    # and not yet in the cache (None: none since the prompt or the forced ids).
    spec: Speculation | None = None
    latest: int | None = None


class BatchGenerator:
    """Token ids for many rows, one step ahead: `step()` queues the next decode step of every row and
    hands back the draws of the step before, for the caller to read while the device works.

    A speculative batch (`speculative`) instead runs `speculate()`: one pass in which each row checks
    its own drafts and takes back its own rejected ones; its cache keeps every row's positions
    (BatchRotatingKVCache, without a window unless max_kv_size is given) for that."""

    def __init__(self, model: Model, quantization: KVQuantization | None = None,
                 max_kv_size: int | None = None, speculative: bool = False, draft_model: Model | None = None) -> None:
        self.model, self.speculative = model, speculative or draft_model is not None
        # Drafts for every row, in a cache stored as the batch's.
        self.draft = BatchDraft(draft_model, model, quantization) if draft_model is not None else None
        self.cache = [BatchKVCache(quantization) if max_kv_size is None and not self.speculative
                      else BatchRotatingKVCache(max_kv_size, quantization) for _ in model.layers]
        self.rows: list[Row] = []

    def add(self, row: Row, cache: list[KVCache]) -> None:
        """A row whose prompt `cache` holds (computed alone), its first draw on its way."""
        for batch, layer in zip(self.cache, cache):
            batch.add(layer)
            _settle(batch)
        if self.draft is not None:
            self.draft.add(row.job.prompt_ids)
        self.rows.append(row)

    def remove(self, rows: set[Row]) -> None:
        keep = [i for i, row in enumerate(self.rows) if row not in rows]
        for c in self.cache:
            c.keep(keep)
            _settle(c)
        if self.draft is not None:
            self.draft.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def step(self) -> list[tuple[Row, Draw]]:
        """Queue a decode step for every row; returns each row's draw of the step before."""
        if self.cache[0].needs_room(1):  # new buffers made one layer at a time, not inside the step
            for c in self.cache:
                c.ready(1)
                _settle(c)
        inputs = [mx.array(row.forced[:1], mx.int32) if row.forced else row.draw.token for row in self.rows]
        before = [(row, row.draw) for row in self.rows]
        with generation_stream():
            logits = self.model.decode(mx.concatenate(inputs)[:, None], self.cache)  # (B, V)
            if any(row.job.draws.grammar is not None for row in self.rows):
                mx.async_eval(logits)  # computing while the masks wait for their rows' tokens (see step())
            groups: dict[tuple, list[int]] = {}
            for i, (row, ids) in enumerate(zip(self.rows, inputs)):
                del row.forced[:1]
                row.job.draws.remember(ids)
                key = row.job.draws.shared_key()
                if key is None:
                    row.draw = row.job.draws.draw(logits[i : i + 1])
                else:
                    groups.setdefault(key, []).append(i)
            for rows in groups.values():
                self._draw_together(logits, rows)
        mx.async_eval([a for row in self.rows for a in row.draw.arrays()])
        return before

    def _draw_together(self, logits: mx.array, rows: list[int]) -> None:
        """One draw for rows whose Pickers share a key (Picker.shared_key): the same function of
        each row's logits, made once for all of them."""
        picker = self.rows[rows[0]].job.draws
        part = logits if len(rows) == len(self.rows) else logits[mx.array(rows)]
        part = picker.process(part, None)  # no penalties, no grammar: the bias alone
        tokens = picker.sample(part, None)  # (G,)
        for j, i in enumerate(rows):
            self.rows[i].draw = Draw(tokens[j : j + 1])

    def speculate(self) -> list[tuple[Row, list[Given]]]:
        """One pass for every row of a speculative batch: its latest token, then its forced ids or its
        drafts; returns the tokens each row gives out (the drafts it kept, then one drawn), which the
        caller reads at once (the next pass feeds them) and hands back what it did not use (take_back).

        Rows feed different numbers of ids: each is padded at its end, where its own queries do not
        look, and its padding and rejected drafts are taken out of its cache after the pass."""
        drafted = self._drafts()
        fed, proposals = zip(*(self._to_feed(row, proposal) for row, proposal in zip(self.rows, drafted)))
        width = max(len(ids) for ids in fed)
        if self.cache[0].needs_room(width):
            for c in self.cache:
                c.ready(width)
                _settle(c)
        greedy = [row.job.draws.argmax_only for row in self.rows]
        with generation_stream():
            logits = self.model(mx.array([ids + [0] * (width - len(ids)) for ids in fed], mx.int32), self.cache)
            # Greedy rows' tokens all at once: one wait for the batch, not one a row.
            argmax = mx.argmax(logits[..., : self.rows[0].job.draws.vocab_limit], axis=-1) if any(greedy) else None
            mx.eval(logits, *([argmax] if argmax is not None else []))
        argmax = argmax.tolist() if argmax is not None else None
        given, unkept = [], []
        for i, (row, ids, proposal) in enumerate(zip(self.rows, fed, proposals)):
            hint = argmax[i][: len(ids)] if greedy[i] else None
            tokens, rejected = self._given(row, logits[i, : len(ids)], proposal, hint)
            given.append((row, tokens))
            unkept.append(width - len(ids) + rejected)
        if any(unkept):
            for c in self.cache:
                c.trim_rows(unkept)
        return given

    def _drafts(self) -> list[Proposal | None]:
        """The draft model's drafts for every row that drafts this step, made together (BatchDraft);
        None for each row when the rows draft on their own (prompt lookup)."""
        if self.draft is None:
            return [None] * len(self.rows)
        ks = [row.spec.length.next() if row.spec is not None and not row.forced else 0 for row in self.rows]
        return self.draft.propose([row.spec.context if k else () for row, k in zip(self.rows, ks)], ks,
                                  [row.job.draws for row in self.rows])

    @staticmethod
    def _to_feed(row: Row, drafted: Proposal | None) -> tuple[list[int], Proposal | None]:
        """A row's ids for the pass, and its drafts among them (None: it feeds forced ids, or does not
        draft); what it feeds is remembered (its history, its grammar). `drafted`: its drafts made
        already (a draft model's, for every row together)."""
        latest = [] if row.latest is None else [row.latest]
        if row.forced or row.spec is None:
            ids = latest + row.forced
            row.job.draws.remember(mx.array(ids, mx.int32))
            if row.spec is not None:
                row.spec.context += row.forced
            row.forced = []
            return ids, None
        proposal = row.spec.draft(drafted)  # remembers the latest token
        return latest + proposal.tokens, proposal

    @staticmethod
    def _given(row: Row, logits: mx.array, proposal: Proposal | None,
               argmax: list[int] | None) -> tuple[list[Given], int]:
        """The tokens a row gives out from its logits (n, V) of the pass, and how many drafts it rejected."""
        if proposal is not None:
            return row.spec.settle(logits, proposal, argmax)
        # The plain loop's draw after the fed ids (the argmax's, when that is all it is).
        token, logprob = (argmax[-1], None) if argmax is not None else row.job.draws.draw(logits[-1:]).read()
        if row.spec is not None:
            row.spec.context.append(token)
        return [(token, logprob)], 0

    def take_back(self, row: Row, unused: int) -> None:
        """The caller did not use the latest `unused` tokens `speculate` gave the row: the fed ones among
        them leave its cache (and its speculation forgets them)."""
        if unused <= 0:
            return
        counts = [unused if r is row else 0 for r in self.rows]
        for c in self.cache:
            c.trim_rows(counts)
        row.spec.take_back(unused)

    @property
    def nbytes(self) -> int:
        """The batch's KV cache, the draft model's cache included."""
        return sum(c.nbytes for c in self.cache) + (self.draft.nbytes if self.draft is not None else 0)


def _settle(cache: BatchKVCache) -> None:
    """Evaluate one layer's new arrays, so that its old ones are freed before the next layer makes its
    own: lazily, every layer's old and new arrays would be in memory at once (memory.py)."""
    mx.eval([a for x in (cache.keys, cache.values, *(cache.head or ())) if x is not None
             for a in (x[:3] if isinstance(x, Packed) else (x,))])
