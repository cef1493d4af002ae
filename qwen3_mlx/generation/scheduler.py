"""The scheduler: requests in, chunks out, between decode steps: admission (a row limit and a KV-memory
budget, first come first served), newcomers' prompts computed at most `prefill_budget` tokens between
two decode steps, several in one pass when they fit in it (prefill.py), then merged into the batch
(batch_decode.py); prefix reuse across requests, cancellation. `batch_generate` (batch.py) runs one in
the caller's thread; engine.Engine runs one in a thread of its own.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

from ..errors import OptionError
from ..model.cache import KVCache
from ..model.kv_quant import KVQuantization
from ..model.model import Model
from ..text.tokenizer import Tokenizer
from .batch_decode import BatchGenerator, Row
from .caches import kept_prefix, new_cache
from .memory import MemoryPlan, default_memory_limit
from .options import EngineOptions
from .passes import extend_cache, step
from .picker import Draw
from .prefill import extend_caches
from .prefix_store import PrefixStore
from .proposers import check_proposers, make_proposer
from .job import Job
from .response import Chunk, TokenLogprob
from .verification import Given, Speculation

Sink = Callable[[Chunk, bool], None]  # (chunk, whether it is the request's last)
# The admission rule: MemoryPlan.room's arguments -> bytes left (negative: the batch does not fit; None: no
# limit). By default the scheduler's own plan; the ranks of a launched job inject rank 0's (distributed/).
Room = Callable[[int, int, int, int, int], int | None]


@dataclass(eq=False)
class Ticket:
    """A request as the scheduler holds it: the job, where its chunks go, whether it was cancelled."""

    job: Job
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    most_tokens: int = 0  # its worst case in the cache
    fail: Callable[[BaseException], None] | None = None  # told when the loop fails


class Scheduler:
    """Requests in, chunks out. Each `run_once()`: admit waiting requests that fit and compute up to
    `prefill_budget` tokens of newcomers' prompts (a row joins the batch when its prompt is done),
    run one decode step, read the draws of the step before.

    Newcomers share a forward pass (prefill.py: padded and masked, each row on its own cache, so that
    it still equals the request alone) while that pass, every newcomer's next chunk padded to the
    longest, stays within what is left of the round's budget: eight prompts of 30 tokens go in one
    pass, eight of 200 one after the other. Never past the budget: on a compute-bound CPU a padded
    token costs what a real one does, so a larger pass computes no faster and every newcomer's first
    token waits for all of them. Measured with 8 clients of 200-token prompts arriving together
    (benchmarks/serve_bench.py clients, tiny-vocab, 2 shared CPU cores, medians of 6 to 12 runs): all
    eight in one pass gave a median time to first token of 4.3 s against 3.4 s one after the other,
    a p95 of 4.9 s against 5.6 s, and 22 against 24 tok/s; within the budget, eight of 20 words in
    one pass gave 2.1 s against 2.3 s (p50) and 2.5 s against 2.9 s (p95).

    Admission: at most `max_batch` rows, first come first served, and a request is admitted only when
    the batch's worst case with it fits (memory.MemoryPlan): its KV cache in `kv_memory` bytes, and
    everything the process holds in `memory_limit` bytes, the prefix store giving memory back first.
    A request that could never fit, even alone, is refused at submit. `room` replaces the plan's rule
    for what fits (Room), as the ranks of a launched job do with rank 0's.

    The cache's kind is the run's: every request's keys and values stored alike (`quantization`), in
    a rotating cache of `max_kv_size` tokens if given, each row keeping its own system prompt.

    Speculative decoding is the run's too: with a `draft_model` or `prompt_lookup`, every row drafts
    (but those whose num_draft_tokens is 0), each with its own proposer (a draft model's own cache per
    row) and draft length, and a row gives the tokens it gives alone through `generate` with the same
    proposer. `speculative` alone: only the rows that ask for prompt_lookup draft.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, options: EngineOptions | None = None, *,
                 draft_model: Model | None = None, prefix_store: PrefixStore | None = None, room: Room | None = None,
                 **changes: Any) -> None:
        options = EngineOptions.of(options, **changes)
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.max_batch, self.prefill_budget = options.max_batch, options.prefill_budget
        self.prefixes = prefix_store
        quantization = options.kv_quantization
        self.quantization, self.max_kv_size = quantization, options.max_kv_size
        if quantization is not None:
            quantization.check(model.args.head_dim)
        limit = default_memory_limit() if options.memory_limit is None else options.memory_limit
        self.plan = MemoryPlan(model, limit=limit, kv_memory=options.kv_memory, quantization=quantization,
                               max_kv_size=self.max_kv_size, draft=draft_model)
        self.room: Room = room or self.plan.room
        # Speculative (a draft model, prompt lookup for every row, or `speculative`: for the rows that ask
        # for prompt lookup): every row takes its tokens from speculate(), drafting when its own options
        # and these say so (make_proposer).
        self.draft_model, self.prompt_lookup = draft_model, options.prompt_lookup
        self.speculative = options.speculative or options.prompt_lookup or draft_model is not None
        self.gen = BatchGenerator(model, quantization, self.max_kv_size, self.speculative, draft_model)
        self.waiting: deque[Ticket] = deque()
        self.prefilling: list[_Prefill] = []  # newcomers whose prompts are being computed, in arrival order
        self.tickets: dict[Row, Ticket] = {}

    # -- requests in

    def check(self, job: Job) -> int:
        """The job's worst case in tokens; refused when it could never fit, even alone (MemoryLimitError),
        or asks for what a batch cannot do."""
        if job.options.max_kv_size not in (None, self.max_kv_size):
            raise OptionError(f"max_kv_size={job.options.max_kv_size} is not this batch's cache "
                              f"({self.max_kv_size or 'not rotating'}): set it for the whole batch or engine, "
                              "or leave it unset")
        kept_prefix(self.tokenizer, job.prompt_ids, self._system(job), self.max_kv_size)  # it must fit a rotating cache
        check_proposers(job.options, self.draft_model)
        if job.options.prompt_lookup and job.options.num_draft_tokens and not self.speculative:
            raise OptionError("prompt_lookup: this batch does not speculate; start it with prompt_lookup (serve "
                              "--prompt-lookup) or a draft model")
        if self.speculative:  # its widest pass: the latest token and its drafts, or its forced text
            self.plan.width = max(self.plan.width, 1 + job.options.num_draft_tokens, 1 + job.forced_tokens())
        asked = job.options.kv_quantization
        if asked is not None and asked != self.quantization:
            raise OptionError(f"{asked} is not this batch's cache, {KVQuantization.describe(self.quantization)}: "
                              f"set it for the whole batch or engine, or leave it unset")
        most = job.most_tokens()
        self.plan.check(most, len(job.prompt_ids), self._chunk(job))
        return most

    def submit(self, ticket: Ticket, checked: bool = False) -> None:
        """Queue a request (`checked`: check() has given its most_tokens already)."""
        if not checked:
            ticket.most_tokens = self.check(ticket.job)
        self.waiting.append(ticket)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.gen.rows)

    # -- one round

    def run_once(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_budget
        while budget > 0:
            self._admit(budget)
            if not self.prefilling:
                break
            budget -= self._prefill_pass(budget)
        if self.gen.rows:
            self._read_given(self.gen.speculate()) if self.speculative else self._read(self.gen.step())

    @staticmethod
    def _system(job: Job) -> str | None:
        return job.prompt.system if job.prompt is not None else None

    def _chunk(self, job: Job) -> int:
        """The most prompt tokens one pass computes for the job."""
        return min(self.prefill_budget, job.options.prefill_step_size, len(job.prompt_ids))

    def _fits(self, ticket: Ticket, budget: int) -> bool:
        """Whether `ticket` joins the newcomers (_shares_pass) and the batch fits with them all (their
        prompts computed in one pass); the prefix store gives memory back first when it would."""
        group = [p.ticket for p in self.prefilling] + [ticket]
        rows = len(self.gen.rows) + len(group)
        if rows > self.max_batch or not self._shares_pass(ticket, budget):
            return False
        longest = max([t.most_tokens for t in group] + [self.tickets[row].most_tokens for row in self.gen.rows])
        room = self.room(rows, longest, max(len(t.job.prompt_ids) for t in group),
                         max(self._chunk(t.job) for t in group), len(group))
        if room is not None and room < 0:
            return False
        if room is not None and self.prefixes is not None:
            self.prefixes.evict(room)
        return True

    def _store_room(self, extra: Ticket | None = None) -> int | None:
        """Bytes the prefix store may hold now, beside the rows there are and the newcomers (and `extra`)."""
        tickets = ([self.tickets[row] for row in self.gen.rows] + [p.ticket for p in self.prefilling]
                   + ([extra] if extra else []))
        room = self.room(len(tickets), max((t.most_tokens for t in tickets), default=0), 0, 1, 1)
        return None if room is None else max(room, 0)

    def _shares_pass(self, ticket: Ticket, budget: int) -> bool:
        """Whether `ticket` joins the newcomers: the first always; another while the pass of every
        newcomer's next chunk, padded to the longest, stays within the round's budget left (rows x
        length: on a compute-bound CPU a padded token costs what a real one does)."""
        if not self.prefilling:
            return True
        chunks = [self._next_chunk(p.ticket.job, p.done, budget) for p in self.prefilling]
        chunks = [n for n in chunks + [self._next_chunk(ticket.job, 0, budget)] if n]
        return len(chunks) * max(chunks, default=0) <= budget

    @staticmethod
    def _next_chunk(job: Job, done: int, most: int) -> int:
        """How many of the job's prompt tokens its next pass computes, `done` of them in its cache: at
        most `most`, never its last token (its first draw's pass computes that)."""
        return max(0, min(most, job.options.prefill_step_size, len(job.prompt_ids) - 1 - done))

    def _admit(self, budget: int) -> None:
        """Waiting requests join the newcomers, first come first served, while they fit (_fits)."""
        while self.waiting and self._fits(self.waiting[0], budget):
            ticket = self.waiting.popleft()
            job = ticket.job
            if job.response.limits.allow_nothing:
                self._finish(ticket)
                continue
            # the job's own cache for its prompt: rotating ones keep its system turn, as generate's does
            cache = new_cache(self.model, self.tokenizer, job.prompt_ids, self._system(job), self.options)
            cached = 0
            if self.prefixes is not None:
                cache, cached = self.prefixes.lookup(job.prompt_ids, cache)
            job.response.stats.cached_tokens = cached
            job.response.clock.restart()
            self.prefilling.append(_Prefill(ticket, cache, cached))

    def _prefill_pass(self, most: int) -> int:
        """The next chunk of every newcomer's prompt, at most `most` (>= 1) tokens each, all but the last
        token, in one pass (prefill.extend_caches; one newcomer's alone, as generate computes it); then
        each newcomer whose prompt is in takes its first draw and joins the batch. Returns the pass's
        length: the most tokens a row computed, at least 1."""
        ahead = [p for p in self.prefilling if self._next_chunk(p.ticket.job, p.done, most)]
        chunks = [p.ticket.job.prompt_ids[p.done : p.done + self._next_chunk(p.ticket.job, p.done, most)]
                  for p in ahead]
        if len(ahead) == 1:
            extend_cache(self.model, ahead[0].cache, chunks[0], ahead[0].ticket.job.options.prefill_step_size)
        elif ahead:
            extend_caches(self.model, [p.cache for p in ahead], chunks)
        for p, chunk in zip(ahead, chunks):
            p.done += len(chunk)
        for p in [p for p in self.prefilling if p.done == len(p.ticket.job.prompt_ids) - 1]:
            self._join(p)
        return max(1, len(chunks) * max((len(c) for c in chunks), default=0))

    def _join(self, p: _Prefill) -> None:
        """A newcomer whose prompt is in, but for its last token: that token's draw, and it joins the batch."""
        job = p.ticket.job
        ids = job.prompt_ids
        draw = step(self.model, p.cache, job.draws, mx.array(ids[-1:], mx.int32), remember=False)
        if self.prefixes is not None:
            self.prefixes.store(ids, p.cache, self._store_room())
        row = Row(job, draw, spec=self._speculation(job))
        self.gen.add(row, p.cache)
        self.tickets[row] = p.ticket
        self.prefilling.remove(p)
        self._take_forced(row)  # a budget of 0 closes the block before the first draw
        if self.speculative:
            if not row.forced:  # else the draw came before them: not read
                row.latest = self._read_draw(row, draw)
                if row.spec is not None:
                    row.spec.context.append(row.latest)
            if not job.response.may_draw():
                self._leave(row, "")
        elif not row.forced:
            # Its first token goes out now, not after the next decode step (other newcomers may be
            # prefilled first in this round): the time to first token is its own prefill's.
            row.read = True
            token = self._read_draw(row, draw)
            if row.forced:  # text forced after it: the token goes to the model first
                row.forced.insert(0, token)
            elif not job.response.may_draw():
                self._leave(row, "")

    # -- chunks out

    def _read(self, draws: list[tuple[Row, Draw]]) -> None:
        done: list[Row] = []  # in the batch's order: a set's order is the process's own, and ranks must agree
        for row, draw in draws:
            if row.read:
                row.read = False
            elif row.discard:
                row.discard -= 1  # a draw made before the forced ids were all in
            else:
                self._read_draw(row, draw)
            # With the last forced id in, the limits are asked before its draw is read, as the
            # single-stream loop asks them after feeding: forced text that reaches a cap ends the row.
            if not row.forced and not row.discard and not row.job.response.may_draw():
                done.append(row)
        for row in done:
            self._leave(row, "")

    def _read_given(self, given: list[tuple[Row, list[Given]]]) -> None:
        """A speculative batch's tokens, each row's read as the single-stream loop reads them
        (generation.run_speculative): those after the response ends or forces text in are handed back."""
        done: list[Row] = []  # in the batch's order: a set's order is the process's own, and ranks must agree
        for row, tokens in given:
            response, used = row.job.response, 0
            for token, logprob in tokens:
                if used and not response.may_draw():
                    break
                used += 1
                self._read_token(row, token, logprob)
            self.gen.take_back(row, len(tokens) - used)
            row.latest = tokens[used - 1][0]
            if row.spec is not None:
                response.stats.drafted_tokens, response.stats.accepted_tokens = row.spec.drafted, row.spec.accepted
            if not response.may_draw():  # forced text (read already) that reaches a cap ends it too
                done.append(row)
        for row in done:
            self._leave(row, "")

    def _speculation(self, job: Job) -> Speculation | None:
        """A speculative batch's row's speculation: None when the request does not draft."""
        if not self.speculative:
            return None
        proposer = make_proposer(self.model, job.options, None, self.prompt_lookup) if self.draft_model is None else (
            self.gen.draft if job.options.num_draft_tokens else None)
        return None if proposer is None else Speculation(job.draws, proposer, job.options.num_draft_tokens,
                                                         job.prompt_ids)

    def _read_draw(self, row: Row, draw: Draw) -> int:
        """A row's draw into its response, and what the response forces after it; the token."""
        token, logprob = draw.read()
        self._read_token(row, token, logprob)
        return token

    def _read_token(self, row: Row, token: int, logprob: TokenLogprob | None) -> None:
        """A row's token into its response, and what the response forces after it."""
        response, ticket = row.job.response, self.tickets[row]
        response.clock.drawn()
        for chunk in response.read(token, logprob=logprob):
            ticket.sink(chunk, False)
        self._take_forced(row)

    def _take_forced(self, row: Row) -> None:
        """Ids the response forces in: it reads them now; they go to the model one a step from the
        next step on, and the draws made until the last of them is in are not read."""
        response, ticket = row.job.response, self.tickets[row]
        forced = response.take_forced()
        if not forced:
            return
        row.forced, row.discard = list(forced), 0 if self.speculative else len(forced)
        response.clock.fed()
        for token in forced:
            for chunk in response.read(token, forced=True):
                ticket.sink(chunk, False)

    def _leave(self, row: Row, reason: str) -> None:
        """The row leaves the batch: its cache for the prefix store, its last chunk to its sink."""
        i = self.gen.rows.index(row)
        if self.prefixes is not None and not reason and self.gen.cache[0].storable(i):
            ids = row.job.prompt_ids + row.job.response.stats.token_ids
            keys_values = [c.row(i) for c in self.gen.cache]
            self.prefixes.store_arrays(ids[: self.gen.cache[0].lengths[i]], keys_values, self._store_room())
        self.gen.remove({row})
        ticket = self.tickets.pop(row)
        if reason:
            row.job.response.stats.finish_reason = reason
        self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        ticket.job.response.clock.stop()
        *chunks, last = ticket.job.response.last_chunks()
        for chunk in chunks:
            ticket.sink(chunk, False)
        ticket.sink(last, True)

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self.waiting if t.cancelled.is_set()]:
            self.waiting.remove(ticket)
            ticket.job.response.stats.finish_reason = "cancelled"
            self._finish(ticket)
        for p in [p for p in self.prefilling if p.ticket.cancelled.is_set()]:
            self.prefilling.remove(p)
            p.ticket.job.response.stats.finish_reason = "cancelled"
            self._finish(p.ticket)
        for row in [row for row in self.gen.rows if self.tickets[row].cancelled.is_set()]:
            self._leave(row, "cancelled")

    def tickets_all(self) -> list[Ticket]:
        """Every request held: waiting, being prefilled, in the batch."""
        return list(self.waiting) + list(self.tickets.values()) + [p.ticket for p in self.prefilling]

    def fail(self) -> list[Ticket]:
        """Drop every request (the loop failed); returns them, for their callers to be told."""
        tickets = self.tickets_all()
        self.waiting.clear()
        self.tickets.clear()
        self.prefilling = []
        self.gen = BatchGenerator(self.model, self.quantization, self.max_kv_size, self.speculative, self.draft_model)
        return tickets


@dataclass
class _Prefill:
    ticket: Ticket
    cache: list[KVCache]
    done: int  # prompt tokens in the cache
