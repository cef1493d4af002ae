"""A stub model with scripted logits, for tests of the generation loop and the chat."""

import time
from types import SimpleNamespace

import mlx.core as mx

from qwen3_mlx.model.cache import KVCache

VOCAB = 151936


class ScriptedModel:
    """Logits that make `script(response so far)` the next token, whatever the sampler.

    It keeps a real KVCache of dummy entries, so trimming and roll-back act as they do on a model.
    Every call takes `seconds_per_call` at least, however many tokens it reads.
    """

    def __init__(self, script, header, seconds_per_call=0.0):
        self.script = script
        self.header = header  # the response is what follows the last occurrence of these ids
        self.args = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096)
        self.fed: list[int] = []
        self.seconds_per_call = seconds_per_call

    def make_cache(self, max_kv_size=None, keep=0, quantization=None):
        return [KVCache()]

    def response(self) -> list[int]:
        h = len(self.header)
        starts = [i + h for i in range(len(self.fed) - h + 1) if self.fed[i : i + h] == self.header]
        return self.fed[max(starts, default=len(self.fed)) :]

    def __call__(self, ids, cache):
        time.sleep(self.seconds_per_call)
        c, n = cache[0], ids.shape[1]
        del self.fed[c.offset :]
        self.fed += ids[0].tolist()
        c.update_and_fetch(mx.zeros((1, 1, n, 2)), mx.zeros((1, 1, n, 2)))
        row = mx.where(mx.arange(VOCAB) == self.script(self.response()), 50.0, 0.0)
        return mx.broadcast_to(row, (1, n, VOCAB))

    def decode(self, ids, cache):
        return self(ids, cache)[:, -1, :]

    layers = [None]
    dtype = mx.float32

    def kv_bytes_per_token(self):  # qwen3_mlx.model.model.LanguageModel
        return 2 * 2 * 4


def thinker(tok, reasoning, answer, reasoning_len=None):
    """<think>, `reasoning` ids cycled (reasoning_len of them, or forever), </think>, "\n\n", `answer`, <|im_end|>."""
    start, end, eot = tok.think_start_id, tok.think_end_id, tok.token_to_id("<|im_end|>")
    (newlines,) = tok.encode("\n\n")

    def script(response):
        if not response:
            return start
        if end not in response:
            n = len(response) - 1
            return end if reasoning_len is not None and n >= reasoning_len else reasoning[n % len(reasoning)]
        i = len(response) - 1 - response.index(end)  # tokens after </think>; the first is "\n\n"
        return newlines if i == 0 else answer[i - 1] if i <= len(answer) else eot

    return script
