"""The tests' one scripted stub model, and its scripts: each row's next token is `script(its prompt, its
response so far)`, whatever the sampler.

The model writes each token's id into its cache as the key, and reads a row's history back from the
cache (a plain KVCache, or a row of the engine's BatchKVCache), so rows join, leave, roll back and
reuse cached prefixes exactly as they do with a real model. A rotating cache past its window holds the
last tokens alone: a single stream's history is then what the model was fed before, up to the offset.
"""

import time
from types import SimpleNamespace

import mlx.core as mx
from checkpoints import QWEN_VOCAB as VOCAB

from qwen3_mlx.model.cache import KVCache

# A pass this long or shorter gets each position scripted (a speculative check reads several); a longer
# one, a prompt's prefill, its last alone (an agent's 12,000-token prompt would take minutes otherwise).
CHECKED_POSITIONS = 65


class ScriptedModel:
    """Logits that make `script(prompt, response)` each row's next token; the response is what follows
    the last `header` in the row's history. Every call takes `seconds_per_call` at least. `fed`: the
    first row's history after the last call (what a single stream has run through the model)."""

    def __init__(self, script, header, seconds_per_call=0.0):
        self.script = script
        self.header = list(header)
        self.seconds_per_call = seconds_per_call
        self.fed: list[int] = []
        self.args = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096, num_hidden_layers=1,
                                    num_key_value_heads=1, head_dim=1, num_attention_heads=1, hidden_size=1,
                                    intermediate_size=1)
        self.layers = [None]
        self.dtype = mx.float32

    def kv_bytes_per_token(self):  # qwen3_mlx.model.model.LanguageModel: the engine's admission reads it
        return 2 * 4

    def make_cache(self, max_kv_size=None, keep=0, quantization=None):
        return [KVCache()]

    def split(self, history: list[int]) -> tuple[list[int], list[int]]:
        """(prompt, response): the response is what follows the last header."""
        h = len(self.header)
        starts = [i + h for i in range(len(history) - h + 1) if history[i : i + h] == self.header]
        at = max(starts, default=len(history))
        return history[:at], history[at:]

    def response(self) -> list[int]:
        return self.split(self.fed)[1]

    def __call__(self, ids, cache):
        time.sleep(self.seconds_per_call)
        B, L = ids.shape
        c = cache[0]
        keys, _ = c.update_and_fetch(*(ids.astype(mx.float32).reshape(B, 1, L, 1),) * 2)
        lengths = getattr(c, "lengths", None) or [c.offset]
        positions = getattr(c, "positions", None)  # a speculative batch's rows may have empty columns
        scripted = L if L <= CHECKED_POSITIONS else 1
        rows = []
        for i, length in enumerate(lengths):
            if positions is None and keys.shape[2] < length:  # a rotating cache past its window: the last tokens
                history = self.fed[: length - L] + ids[i].tolist()
            else:
                cols = range(keys.shape[2] - length, keys.shape[2]) if positions is None \
                    else (positions[i] >= 0).nonzero()[0]
                history = [int(t) for t in keys[i, 0, mx.array([int(c) for c in cols]), 0].tolist()]
            if i == 0:
                self.fed = history
            # Each scripted position reads its own history.
            nexts = mx.array([self.script(*self.split(history[: len(history) - scripted + 1 + j]))
                              for j in range(scripted)])
            logits = mx.where(mx.arange(VOCAB)[None, :] == nexts[:, None], 50.0, 0.0)  # (scripted, VOCAB)
            rows.append(mx.broadcast_to(logits, (L, VOCAB)))
        return mx.stack(rows)  # (B, L, VOCAB)

    def decode(self, ids, cache):
        return self(ids, cache)[:, -1, :]


# ---------------------------------------------------------------- scripts


def thinker(tok, reasoning, answer, reasoning_len=None):
    """<think>, `reasoning` ids cycled (reasoning_len of them, or forever), </think>, "\n\n", `answer`, <|im_end|>."""
    start, end, eot = tok.think_start_id, tok.think_end_id, tok.token_to_id("<|im_end|>")
    (newlines,) = tok.encode("\n\n")

    def script(prompt, response):
        if not response:
            return start
        if end not in response:
            n = len(response) - 1
            return end if reasoning_len is not None and n >= reasoning_len else reasoning[n % len(reasoning)]
        i = len(response) - 1 - response.index(end)  # tokens after </think>; the first is "\n\n"
        return newlines if i == 0 else answer[i - 1] if i <= len(answer) else eot

    return script


def replies(tok, reasoning: str, answer: str):
    """A script: <think>reasoning</think>\\n\\n then `answer`, then <|im_end|>; without the reasoning
    when the prompt closed it already (enable_thinking false)."""
    closed = tok.encode("</think>\n\n")
    ids = tok.encode(f"<think>\n{reasoning}\n</think>\n\n{answer}") + [tok.token_to_id("<|im_end|>")]
    direct = tok.encode(answer) + [tok.token_to_id("<|im_end|>")]

    def script(prompt, response):
        if prompt[-len(closed) :] == closed:
            return direct[min(len(response), len(direct) - 1)]
        # After a forced cut the response holds other tokens: go on with the answer from there.
        if tok.think_end_id in response and tok.think_end_id in ids:
            after = len(response) - 1 - response.index(tok.think_end_id)
            rest = ids[ids.index(tok.think_end_id) + 1 :]
            return rest[min(after, len(rest) - 1)]
        return ids[min(len(response), len(ids) - 1)]

    return script


def by_prompt(tok, scripts: dict[str, object], default):
    """A script that runs scripts[marker] for prompts whose text holds marker, else `default`."""

    def script(prompt, response):
        text = tok.decode(prompt)
        chosen = next((s for marker, s in scripts.items() if marker in text), default)
        return chosen(prompt, response)

    return script
