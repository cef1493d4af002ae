"""What every method runs on: the hidden states entering each decoder layer, and the inputs each of a
layer's Linears sees, recorded by swapping the Linear for a Recorder for one pass.

The samples are (N, L) token ids; hidden states are (N, L, hidden), run through a layer `batch` rows
at a time with the causal mask (no cache: each sample is one whole sequence).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..model.model import DecoderLayer, Model

# A decoder layer's Linears in the order their inputs arise; each tuple shares one input.
STEPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEARS = tuple(name for step in STEPS for name in step)


class Recorder(nn.Module):
    """A Linear's stand-in for one pass: answers as the Linear and keeps what it was given."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.seen: list[mx.array] = []

    def __call__(self, x: mx.array) -> mx.array:
        self.seen.append(x)
        return self.linear(x)

    def inputs(self) -> mx.array:
        """(N, L, in): every input of the pass, in order."""
        return mx.concatenate(self.seen, axis=0)


def fits(linear: nn.Module, group_size: int) -> bool:
    """Whether the converter quantizes this Linear: its input width is a whole number of groups."""
    return linear.weight.shape[1] % group_size == 0


def submodule(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


@contextlib.contextmanager
def recording(layer: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Recorder]]:
    """The named Linears of `layer` (dotted paths) swapped for Recorders while the block runs."""
    recorders = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        recorders[name] = Recorder(getattr(submodule(layer, parent), leaf))
        setattr(submodule(layer, parent), leaf, recorders[name])
    try:
        yield recorders
    finally:
        for name, recorder in recorders.items():
            parent, _, leaf = name.rpartition(".")
            setattr(submodule(layer, parent), leaf, recorder.linear)


def embedded(model: Model, samples: mx.array) -> mx.array:
    """The hidden states (N, L, hidden) entering the first layer."""
    return model.model.embed_tokens(samples)


def run_layer(layer: DecoderLayer, x: mx.array, batch: int = 8) -> mx.array:
    """The layer's output for hidden states x (N, L, hidden), `batch` samples at a time."""
    out = []
    for start in range(0, x.shape[0], batch):
        out.append(layer(x[start:start + batch], "causal", None))
        mx.eval(out[-1])
    return mx.concatenate(out, axis=0)


def layer_inputs(layer: DecoderLayer, x: mx.array, names: Sequence[str], batch: int = 8) -> dict[str, mx.array]:
    """The inputs (N, L, in) the named Linears of `layer` see when it runs on x."""
    with recording(layer, names) as recorders:
        run_layer(layer, x, batch)
    return {name: recorder.inputs() for name, recorder in recorders.items()}


def logits(model: Model, samples: mx.array, batch: int = 8) -> mx.array:
    """The model's logits (N, L, vocab) of the samples, in float32."""
    out = []
    for start in range(0, samples.shape[0], batch):
        out.append(model(samples[start:start + batch]).astype(mx.float32))
        mx.eval(out[-1])
    return mx.concatenate(out, axis=0)


def kl_divergence(reference: mx.array, logits_: mx.array) -> mx.array:
    """KL(reference || logits) per position, in nats: (...) from two (..., vocab) logits."""
    p, q = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (reference, logits_))
    return (mx.exp(p) * (p - q)).sum(axis=-1)
