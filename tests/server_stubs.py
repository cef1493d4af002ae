"""A scripted stub model that batches: each row's next token is `script(its prompt, its response so far)`.

The model keeps no state of its own: it writes each token's id into its cache as the key, and reads
a row's history back from the cache (a plain KVCache, or a row of the engine's BatchKVCache), so rows
join, leave and reuse cached prefixes exactly as they do with a real model.
"""

from types import SimpleNamespace

import mlx.core as mx

from qwen3_mlx.model.cache import KVCache

VOCAB = 151936


class BatchScriptedModel:
    def __init__(self, script, header):
        self.script = script
        self.header = list(header)  # a row's response is what follows the last occurrence of these ids
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

    def __call__(self, ids, cache):
        B, L = ids.shape
        c = cache[0]
        keys, _ = c.update_and_fetch(*(ids.astype(mx.float32).reshape(B, 1, L, 1),) * 2)
        lengths = getattr(c, "lengths", None) or [c.offset]
        rows = []
        positions = getattr(c, "positions", None)  # a speculative batch's rows may have empty columns
        for i, length in enumerate(lengths):
            cols = range(keys.shape[2] - length, keys.shape[2]) if positions is None else (positions[i] >= 0).nonzero()[0]
            history = [int(t) for t in keys[i, 0, mx.array([int(c) for c in cols]), 0].tolist()]
            # Each of the L positions reads its own history (a speculative pass checks several).
            nexts = [self.script(*self.split(history[: len(history) - L + 1 + j])) for j in range(L)]
            rows.append(mx.stack([mx.where(mx.arange(VOCAB) == t, 50.0, 0.0) for t in nexts]))
        return mx.stack(rows)  # (B, L, VOCAB)

    def decode(self, ids, cache):
        return self(ids, cache)[:, -1, :]


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
