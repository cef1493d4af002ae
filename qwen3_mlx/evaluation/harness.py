"""lm-eval's harness on our model: the `qwen3-mlx` model of lm-eval's registry (registered when this
module is imported, beside lm-eval's own), and `evaluate`, over lm-eval's simple_evaluate.

A (context, continuation) pair is tokenized as lm-eval's `hf` model does it: the context's trailing spaces
moved to the continuation, the continuation's ids those of the whole after the context's, and an empty
context replaced by <|endoftext|>, where Qwen3's documents start (lm-eval's `hf` takes the tokenizer's eos,
<|im_end|>, unless given prefix_token_id). Continuations of one context share its pass; other rows are
scored together, longest first, padded on the right;
a rolling loglikelihood is perplexity's windows of `max_length` side by side, every token scored once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  lm-eval's own models, registered first: a registry that is not empty skips them
import mlx.core as mx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..checkpoint.loader import load
from ..errors import Qwen3Error
from ..files import written_atomically
from ..generation.batch import batch_generate
from ..generation.options import EngineOptions, GenerationOptions
from ..model.model import LanguageModel
from ..text.prompt import Prompt
from ..text.tokenizer import Tokenizer
from .documents import Document
from .perplexity import total_nll

END_OF_TEXT = "<|endoftext|>"


@register_model("qwen3-mlx")
class Qwen3LM(LM):
    """lm-eval's model interface over a checkpoint (`model`, a folder or Hub id) or a loaded model and its
    tokenizer: loglikelihood, loglikelihood_rolling and generate_until, each batched (lm-eval's
    model_args: model=, batch_size=, max_length=, think=, thinking_budget=). `think` is Qwen3's thinking
    mode for chat-templated contexts; generated answers are returned without their reasoning."""

    def __init__(self, model: str | LanguageModel, tokenizer: Tokenizer | None = None,
                 batch_size: int | str = 8, max_length: int | str = 2048, think: bool | str = False,
                 thinking_budget: int | str | None = None, **unused: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = load(model) if isinstance(model, str) else (model, tokenizer)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.think = think in (True, "True", "true", "1")
        self.thinking_budget = None if thinking_budget in (None, "None") else int(thinking_budget)
        self.prefix_token_id = self.tokenizer.token_to_id(END_OF_TEXT)

    @property
    def tokenizer_name(self) -> str:
        return "qwen3"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=self.think)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        rows = [self.encode_pair(*request.args) for request in requests]
        return continuation_scores(self.model, rows, self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        out = []
        for request in requests:
            ids = [self.prefix_token_id] + self.tokenizer.encode(request.args[0])
            total, _ = total_nll(self.model, [Document(ids, [i > 0 for i in range(len(ids))])], self.max_length,
                                 self.max_length, self.batch_size)
            out.append(-total)
        return out

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        prompts, options = [], []
        for request in requests:
            context, kwargs = request.args
            prompts.append(Prompt(context, raw=True))
            options.append(self.generation_options(kwargs))
        results = batch_generate(self.model, self.tokenizer, prompts, options,
                                 engine_options=EngineOptions(max_batch=self.batch_size))
        return [result.content for result in results]

    def generation_options(self, kwargs: dict[str, Any]) -> GenerationOptions:
        """lm-eval's gen_kwargs (until, max_gen_toks, do_sample, temperature) as our options; greedy unless
        sampling is asked for."""
        until = kwargs.get("until") or ()
        temp = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        return GenerationOptions(think=self.think, thinking_budget=self.thinking_budget if self.think else None,
                                 max_tokens=int(kwargs.get("max_gen_toks", 256)), temp=temp,
                                 stop=(until,) if isinstance(until, str) else tuple(until), seed=0)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(the ids of context and continuation, how many of them are the continuation's)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            ids = self.tokenizer.encode(continuation)
            return [self.prefix_token_id] + ids, len(ids)
        whole, head = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return whole, len(whole) - len(head)


def continuation_scores(model: LanguageModel, rows: Sequence[tuple[list[int], int]], batch_size: int,
                        max_length: int) -> list[tuple[float, bool]]:
    """Each row's (log-likelihood of its last n ids given the ones before, whether greedy decoding picks
    every one of them), reading at most `max_length` ids before each. Rows that share a context (a
    question's choices) read it once: the context's pass, then their continuations over its cache."""
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = {}
    alone = []
    for i, (ids, n) in enumerate(rows):
        if len(ids) <= max_length + 1 and len(ids) > n:
            groups.setdefault(tuple(ids[:-n]), []).append(i)
        else:
            alone.append(i)
    for context, members in groups.items():
        if len(members) == 1:
            alone += members
            continue
        shared = shared_context_scores(model, list(context), [rows[i][0][len(context):] for i in members])
        for i, result in zip(members, shared):
            out[i] = result
    order = sorted(alone, key=lambda i: -len(rows[i][0]))
    for at in range(0, len(order), batch_size):
        chosen = order[at:at + batch_size]
        windows = [rows[i][0][-(max_length + 1):] for i in chosen]
        width = max(len(w) for w in windows) - 1
        logits = model(mx.array([w[:-1] + [0] * (width - len(w) + 1) for w in windows]))  # (B, L, vocab)
        for row, (i, window) in enumerate(zip(chosen, windows)):
            n = rows[i][1]
            out[i] = score(logits[row, len(window) - 1 - n:len(window) - 1], window[-n:])
    return out


def shared_context_scores(model: LanguageModel, context: list[int],
                          continuations: Sequence[list[int]]) -> list[tuple[float, bool]]:
    """The scores of continuations of one context: the context computed once into a cache, which the
    continuations (but their last ids, which nothing follows) then read, one row each."""
    cache = model.make_cache()
    last = model(mx.array([context]), cache)[0, -1:]  # (1, vocab): what follows the context
    longest = max(len(c) for c in continuations)
    if longest == 1:
        return [score(last, c) for c in continuations]
    for layer in cache:  # the context's keys and values, one copy a row: (rows, H_kv, context, D)
        layer.keys, layer.values = (mx.repeat(x[:, :, :layer.offset], len(continuations), axis=0)
                                    for x in (layer.keys, layer.values))
    rest = model(mx.array([c[:-1] + [0] * (longest - len(c)) for c in continuations]), cache)  # (rows, L, vocab)
    return [score(mx.concatenate([last, rest[row, :len(c) - 1]]), c) for row, c in enumerate(continuations)]


def score(logits: mx.array, targets: Sequence[int]) -> tuple[float, bool]:
    """(the summed log-probability of `targets` under logits (n, vocab), whether each is the argmax)."""
    logprobs, wanted = log_softmax(logits.astype(mx.float32)), mx.array(targets)
    picked = mx.take_along_axis(logprobs, wanted[:, None], axis=-1)[:, 0]
    return float(picked.sum().item()), bool(mx.all(logprobs.argmax(axis=-1) == wanted).item())


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def evaluate(model: str | LanguageModel, tasks: Sequence[str], *, tokenizer: Tokenizer | None = None,
             include_path: Path | None = None, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, apply_chat_template: bool = False, think: bool = False,
             thinking_budget: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's tasks run on the model, through lm-eval's simple_evaluate.

    Args:
        model: a checkpoint (folder or Hub id), or a loaded model with its `tokenizer`.
        tasks: lm-eval task names, or those of task YAML files under `include_path`.
        limit: the first N documents of each task (a fraction below 1: that share of them).
        apply_chat_template: contexts written as chat turns (few-shot examples as earlier turns), in
            Qwen3's thinking mode when `think` (with at most `thinking_budget` reasoning tokens).

    Returns:
        lm-eval's results dict (results, configs, versions; samples when `log_samples`).

    Raises:
        Qwen3Error: a task lm-eval does not know.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        where = f" nor under {include_path}" if include_path else "; --include-path DIR reads task YAML files"
        raise Qwen3Error(f"unknown task {', '.join(unknown)}: not one of lm-eval's{where}")
    lm = Qwen3LM(model, tokenizer, batch_size=batch_size, think=think, thinking_budget=thinking_budget)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, apply_chat_template=apply_chat_template,
                           log_samples=log_samples, batch_size=batch_size)


def write_results(results: dict, folder: Path) -> list[Path]:
    """results.json (all but the samples) and, when logged, samples_TASK.jsonl per task, written into
    `folder`; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {folder / "results.json": json.dumps({k: v for k, v in results.items() if k != "samples"},
                                                 indent=2, default=str)}
    for task, samples in results.get("samples", {}).items():
        files[folder / f"samples_{task}.jsonl"] = "".join(json.dumps(s, default=str) + "\n" for s in samples)
    for path, text in files.items():
        with written_atomically(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return list(files)
