"""Structured output: a JSON schema, regex or grammar that masks the logits, one token at a time (llguidance)."""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np
import tokenizers
from llguidance.gbnf_to_lark import gbnf_to_lark

from ..errors import OptionError, Qwen3Error
from .tokenizer import Tokenizer

# JSON whitespace in a gap: what formatting needs and no more, so that a weak or random model cannot
# spend its tokens on it (llguidance's default, [ \t\n\r]+, lets it loop on whitespace forever): none,
# one space, or a newline and two spaces a level, ten levels deep (json.dumps' indent=2 or 4).
JSON_WHITESPACE = r"(?:\x20|\x0A(?:\x20\x20){0,10})?"
# A GBNF rule definition (`name ::= ...`) at the start of a line; Lark has no `::=`.
_GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z][A-Za-z0-9_-]*\s*::=")
# llguidance's "at line(column): " before a message.
_POSITION = re.compile(r"^at \d+\(\d+\): ")
_SPECS = ("json_schema", "regex", "grammar")
_NEG_INF_BITS = np.uint32(0xFF800000)  # float32 -inf


# ---------------------------------------------------------------- the vocabulary


class GrammarVocabulary:
    """The tokenizer as llguidance sees it, sized to the model's logits.

    Building one takes about 1.5 s on the 151k-token Qwen3 vocabulary, so make one per loaded model and
    compile every request's constraint against it.
    """

    vocab_size: int  # the width of the logits masked, the model's embedding rows
    eos_token_ids: frozenset[int]
    think_start_id: int | None
    think_end_id: int | None
    ll_tokenizer: llguidance.LLTokenizer

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        """Args:
        tokenizer: the checkpoint's parsed tokenizer.json.
        vocab_size: the model's vocabulary size (`model.args.vocab_size`); ids the tokenizer does not know
            (151669..151935 for Qwen3) are never allowed.
        eos_token_ids: the ids that end a turn (`Tokenizer.eos_token_ids`): each is allowed exactly when the
            answer is complete.

        Raises:
            Qwen3Error: vocab_size is below the tokenizer's ids, or no end-of-turn id is given.
        """
        known = max(tokenizer.get_vocab_size(with_added_tokens=False),
                    max(tokenizer.get_added_tokens_decoder(), default=-1) + 1)
        if vocab_size < known:
            raise Qwen3Error(f"vocab_size={vocab_size} is below the tokenizer's {known} ids; the checkpoint's "
                             "config.json and tokenizer.json do not belong together")
        self.eos_token_ids = frozenset(eos_token_ids)
        if not self.eos_token_ids:
            raise Qwen3Error("structured output needs the end-of-turn ids (eos_token_ids), and none were given")
        self.vocab_size = vocab_size
        self.think_start_id = tokenizer.token_to_id("<think>")
        self.think_end_id = tokenizer.token_to_id("</think>")
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                   eos_token=sorted(self.eos_token_ids))


# ---------------------------------------------------------------- compiling a constraint


class Grammar:
    """A compiled constraint; `state()` gives each sequence its own matcher."""

    def __init__(self, vocabulary: GrammarVocabulary, serialized: str, matcher: llguidance.LLMatcher) -> None:
        self.vocabulary = vocabulary
        self.serialized = serialized  # llguidance's grammar JSON: what to cache to skip the conversion
        self._matcher = matcher  # never advanced: the start state the sequences copy

    def state(self) -> GrammarState:
        """A fresh matcher at the grammar's start, for one sequence."""
        return GrammarState(self._matcher.deep_copy(), self.vocabulary)


def compile_constraint(
    vocabulary: GrammarVocabulary,
    *,
    json_schema: Mapping[str, Any] | type | None = None,
    regex: str | None = None,
    grammar: str | None = None,
    thinking: bool,
) -> Grammar:
    """Compile what the answer must match; give exactly one of json_schema, regex and grammar.

    Args:
        vocabulary: the model's GrammarVocabulary.
        json_schema: a JSON schema object, or a pydantic model class (its `model_json_schema()`).
        regex: a regular expression (Rust regex syntax) the whole answer matches.
        grammar: a Lark grammar (llguidance's dialect, rule `start`), or a GBNF grammar (llama.cpp, rule
            `root`), told apart by GBNF's `::=`.
        thinking: True when the model may reason first: the grammar then allows an optional
            `<think>` free text `</think>` block and whitespace before the answer. False when the prompt has
            already closed the block, and the answer starts at once.

    Returns:
        The compiled Grammar; end-of-turn ids are allowed exactly where the answer is complete.

    Raises:
        OptionError: not exactly one of the three, a schema or grammar llguidance rejects or does not
            support (one line, prefixed with the argument's name), or thinking=True with a tokenizer that
            has no <think> and </think> tokens.
    """
    given = [name for name, value in zip(_SPECS, (json_schema, regex, grammar)) if value is not None]
    if len(given) != 1:
        raise OptionError(f"structured output: give exactly one of json_schema, regex or grammar, "
                          f"got {' and '.join(given) or 'none'}")
    name = given[0]
    if name == "json_schema":
        answer = _json_schema_grammar(json_schema)
    elif name == "regex":
        answer = _one_grammar(llguidance.LLMatcher.grammar_from_regex(_text("regex", regex)))
    else:
        answer = {"lark_grammar": _lark(_text("grammar", grammar))}
    top = {"grammars": [_reasoning_wrapper(vocabulary), {**answer, "name": "answer"}] if thinking else [answer]}
    serialized = json.dumps(top)
    matcher = llguidance.LLMatcher(vocabulary.ll_tokenizer, serialized, log_level=0)
    if matcher.is_error():
        message = _first_line(matcher.get_error())
        if name == "regex":  # its position is in the one-line grammar llguidance wrapped the regex in
            message = _POSITION.sub("", message)
        raise OptionError(f"{name}: {message}")
    return Grammar(vocabulary, serialized, matcher)


def _json_schema_grammar(schema: Any) -> dict:
    if isinstance(schema, type):
        schema = _pydantic_schema(schema)
    if not isinstance(schema, Mapping):
        raise OptionError(f"json_schema: expected a JSON schema object or a pydantic model class, "
                          f"got {type(schema).__name__}")
    try:
        # defaults, not overrides: a schema's own "x-guidance" options still win.
        text = llguidance.LLMatcher.grammar_from_json_schema(dict(schema),
                                                             defaults={"whitespace_pattern": JSON_WHITESPACE})
    except (ValueError, TypeError) as e:  # a value json cannot serialize
        raise OptionError(f"json_schema: {_first_line(str(e))}") from e
    return _one_grammar(text)


def _pydantic_schema(model: type) -> dict:
    # Imported here: pydantic is needed only by callers that pass a model class.
    try:
        import pydantic
    except ImportError as e:
        raise OptionError(f"json_schema: {model.__name__} is a class but pydantic is not installed") from e
    if not issubclass(model, pydantic.BaseModel):
        raise OptionError(f"json_schema: {model.__name__} is not a pydantic BaseModel subclass; give a schema "
                          "object or a pydantic model class")
    return model.model_json_schema()


def _one_grammar(top_level: str) -> dict:
    """The single grammar of llguidance's {"grammars": [...]} JSON."""
    (one,) = json.loads(top_level)["grammars"]
    return one


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise OptionError(f"{name}: expected a string, got {type(value).__name__}")
    return value


def _lark(grammar: str) -> str:
    if not _GBNF_RULE.search(grammar):
        return grammar
    try:
        return gbnf_to_lark(grammar)
    except Exception as e:  # the converter raises bare Exceptions too (an undefined rule)
        raise OptionError(f"grammar: GBNF: {_first_line(str(e))}") from e


def _reasoning_wrapper(vocabulary: GrammarVocabulary) -> dict:
    """A Lark grammar: an optional <think> block, whitespace, then the grammar named "answer".

    The block's text is a terminal, and terminals never match special tokens, so the block ends at the
    real </think> token only; any text in it is accepted, the thinking budget's forced early-stop text too.
    """
    start, end = vocabulary.think_start_id, vocabulary.think_end_id
    if start is None or end is None:
        raise OptionError("structured output with thinking: the tokenizer has no <think> and </think> tokens; "
                          "turn thinking off")
    lark = (f"start: reasoning? @answer\n"
            f"reasoning: <[{start}]> /(?s:.*)/ <[{end}]> /[ \\t\\r\\n]{{0,32}}/\n")
    return {"lark_grammar": lark}


def _first_line(message: str) -> str:
    """llguidance's message cut to one line; where that line ends in ':' the detail is an `error:` line
    further down (regex errors), so it is appended."""
    lines = [line.strip() for line in message.strip().splitlines()]
    first = lines[0] if lines else "rejected"
    if first.endswith(":"):
        detail = next((line for line in lines[1:] if line.startswith("error:")), None)
        if detail is not None:
            first = f"{first} {detail.removeprefix('error:').strip()}"
    return first


def response_format_schema(response_format: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """OpenAI's `response_format` as the JSON schema the answer must match; None for text.
    {"type": "json_object"} is any object; {"type": "json_schema", "json_schema": {"name", "schema"}}
    its schema (any object when it has none).

    Raises:
        OptionError: not one of the three forms (the schema itself is checked when compiled).
    """
    kind = response_format.get("type", "text") if isinstance(response_format, Mapping) else None
    if response_format is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
        raise OptionError('response_format: give {"type": "text"}, {"type": "json_object"} or '
                          '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    return spec.get("schema", {"type": "object"})


def checked_schema(schema: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(schema, Mapping):
        raise OptionError(f"{where}: a JSON schema is an object, got {type(schema).__name__}")
    try:
        error = llguidance.LLMatcher.validate_grammar(json.dumps({"grammars": [_json_schema_grammar(schema)]}))
    except OptionError as e:
        error = str(e).removeprefix("json_schema: ")
    if error:
        raise OptionError(f"{where}: {_first_line(error)}")
    return schema


def with_whitespace(schema: Mapping[str, Any]) -> dict:
    """The schema with our bounded JSON whitespace, unless it sets its own llguidance options."""
    return {"x-guidance": {"whitespace_pattern": JSON_WHITESPACE}, **schema}


# ---------------------------------------------------------------- one sequence's matcher


class GrammarState:
    """Where one sequence stands in the grammar: masks its next logits and consumes its tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, vocabulary: GrammarVocabulary) -> None:
        self._matcher = matcher
        self._vocabulary = vocabulary
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocabulary.vocab_size)  # (1, ceil(V / 32))

    def mask(self, logits: mx.array) -> mx.array:
        """The logits with every token the grammar forbids next set to -inf.

        The allowed set is computed on the host (llguidance) and applied with MLX on the default device.

        Args:
            logits: (V,) or (1, V) logits of the next token, V the vocabulary's vocab_size.

        Returns:
            Logits of the same shape and dtype.

        Raises:
            ValueError: the logits' last axis is not the vocabulary's size.
        """
        size = self._vocabulary.vocab_size
        if logits.shape[-1] != size:
            raise ValueError(f"logits have {logits.shape[-1]} entries but the grammar was compiled for a "
                             f"vocabulary of {size}")
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        # Bit j of 32-bit word i allows token 32 * i + j: in little-endian bytes, bit 32 * i + j in order.
        allowed = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[:size]  # (V,) 0 or 1
        # -inf where forbidden and +0 where allowed, written as float32 bit patterns, then added: on the
        # CPU this costs a third of mx.where over the vocabulary (0.34 against 1.0 ms).
        penalty = ((1 - allowed).astype(np.uint32) * _NEG_INF_BITS).view(np.float32)
        return logits + mx.array(penalty).astype(logits.dtype)

    def advance(self, token: int) -> None:
        """Consume the sequence's next token, sampled from the masked logits or forced by the loop (the
        thinking budget's early-stop text is accepted anywhere inside the reasoning block).

        Raises:
            Qwen3Error: the grammar forbids the token here; the state is then unusable. For a sampled token
                this is a bug (the mask allowed it); for a forced one, the loop forced it outside the block.
        """
        if not self._matcher.consume_token(int(token)):
            shown = self._vocabulary.ll_tokenizer.dbg_tokens([int(token)])
            raise Qwen3Error(f"structured output: token {token} {shown} is not allowed by the grammar here: "
                             f"{_first_line(self._matcher.get_error())}")

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the first, the grammar allows next (speculative drafts are cut there)."""
        return self._matcher.validate_tokens([int(t) for t in tokens]) if tokens else 0

    def rollback(self, n: int) -> None:
        """Take back the last `n` tokens consumed (drafts that verification did not keep)."""
        if n and not self._matcher.rollback(n):
            raise Qwen3Error(f"structured output: could not take back {n} tokens: "
                             f"{_first_line(self._matcher.get_error())}")

    @property
    def accepting(self) -> bool:
        """The answer could end here: an end-of-turn token is allowed next."""
        return self._matcher.is_accepting()

    @property
    def done(self) -> bool:
        """Nothing but an end-of-turn token can follow (or one was consumed): the answer is complete."""
        return self._matcher.is_stopped()


# ---------------------------------------------------------------- for the generation loop

# One GrammarVocabulary per tokenizer and vocabulary size, for the life of the tokenizer; requests are
# prepared in many threads (the server's workers), so the first build is made once, under the lock.
_VOCABULARIES: weakref.WeakKeyDictionary[Tokenizer, dict[int, GrammarVocabulary]] = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def grammar_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> GrammarVocabulary:
    """The tokenizer's GrammarVocabulary for a model of `vocab_size` logits, built at the first call."""
    with _VOCABULARIES_LOCK:
        sizes = _VOCABULARIES.setdefault(tokenizer, {})
        if vocab_size not in sizes:
            sizes[vocab_size] = GrammarVocabulary(tokenizer.backend, vocab_size, tokenizer.eos_token_ids)
        return sizes[vocab_size]


def constraint_state(tokenizer: Tokenizer, vocab_size: int, *, json_schema: Mapping[str, Any] | type | None,
                     regex: str | None, grammar: str | None, thinking: bool, in_reasoning: bool) -> GrammarState:
    """A request's matcher at the start of its response.

    Args:
        tokenizer: the checkpoint's Tokenizer; its GrammarVocabulary for `vocab_size` is built at the
            first request (about 1.5 s) and kept (grammar_vocabulary).
        thinking: the model may reason before the answer (the prompt did not close the block).
        in_reasoning: the prompt ends inside the reasoning block (it opened it with <think>).

    Raises:
        OptionError: as compile_constraint.
    """
    vocabulary = grammar_vocabulary(tokenizer, vocab_size)
    state = compile_constraint(vocabulary, json_schema=json_schema, regex=regex, grammar=grammar,
                               thinking=thinking or in_reasoning).state()
    if in_reasoning:
        state.advance(tokenizer.think_start_id)
    return state
