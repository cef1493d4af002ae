"""Training against its references on tiny random checkpoints (fp32, CPU): mlx-lm's tuner (the same seed
gives the same initial adapters, losses and trained weights), PEFT (LoRA's and DoRA's loss and gradients
on all seven projections, the magnitude at init), torch autograd (full fine-tuning), and QLoRA against
LoRA over the same base dequantized."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from checkpoints import make_checkpoint
from qwen3_mlx.checkpoint.adapters import AdapterConfig, apply_adapters
from qwen3_mlx.checkpoint.loader import load_model
from qwen3_mlx.training.batches import make_batch
from qwen3_mlx.training.data import Example
from qwen3_mlx.training.loop import loss, train
from qwen3_mlx.training.options import PROJECTIONS, TrainingOptions

LENGTH = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("train"), vocab_size=256)


def random_examples(n: int, length: int = LENGTH, seed: int = 1) -> list[Example]:
    rng = np.random.RandomState(seed)
    return [Example(tuple(int(t) for t in rng.randint(0, 256, length)), (False,) + (True,) * (length - 1), f"x:{i}")
            for i in range(n)]


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_lora_trains_as_mlx_lm_tuner_does_from_the_same_seed(checkpoint):
    """Same checkpoint, examples, seed and options: ours and mlx_lm.tuner draw the same A, see the same
    batches, and give the same losses and adapters. Every example is max_seq_length long, where mlx-lm's
    mask trains no padding token (see test_the_mask_trains_no_padding_where_mlx_lm_does)."""
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load_model

    data = random_examples(6)
    options = TrainingOptions(num_layers=-1, iters=4, batch_size=2, max_seq_length=LENGTH, learning_rate=1e-3,
                              seed=3, steps_per_report=1)
    ours = load_model(checkpoint)
    result = train(ours, None, data, options=options)

    theirs, _ = mlx_lm_load_model(checkpoint)
    mx.random.seed(3)
    theirs.freeze()
    linear_to_lora_layers(theirs, -1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    first_a = theirs.layers[0].self_attn.q_proj.lora_a
    fresh = load_model(checkpoint)
    mx.random.seed(3)
    fresh.freeze()
    apply_adapters(fresh, AdapterConfig(num_layers=-1))
    assert mx.array_equal(fresh.layers[0].self_attn.q_proj.lora_a, first_a)

    losses = []

    class Callback:
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    np.random.seed(3)
    import mlx.optimizers as optim

    mlx_lm_train(theirs, optim.Adam(learning_rate=1e-3), [(list(e.ids), 0) for e in data],
                 args=TrainingArgs(batch_size=2, iters=4, steps_per_report=1, steps_per_eval=1000,
                                   steps_per_save=1000, max_seq_length=LENGTH,
                                   adapter_file=str(checkpoint.parent / "mlx_lm_adapters.safetensors")),
                 training_callback=Callback())
    assert np.allclose(result.losses, losses, rtol=1e-5, atol=0), (result.losses, losses)
    ours_w = {k: v for k, v in tree_flatten(ours.trainable_parameters())}
    theirs_w = {k: v for k, v in tree_flatten(theirs.trainable_parameters())}
    assert sorted(ours_w) == sorted(theirs_w)
    assert max(relative(ours_w[k], theirs_w[k]) for k in ours_w) < 1e-4


def test_the_mask_trains_no_padding_where_mlx_lm_does():
    """mlx-lm's mask (steps <= length) also trains each row on predicting the padding after its end;
    ours stops at the last token, as transformers' labels of -100 do."""
    short, long = random_examples(1, 10)[0], random_examples(1, 40)[0]
    batch = make_batch([short, long], 2048)
    assert batch.ids.shape == (2, 64)
    assert batch.mask[0].sum().item() == 9 and batch.mask[1].sum().item() == 39


def torch_model(checkpoint):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(checkpoint, torch_dtype="float32").eval()


def batch_and_labels(rows: int = 3):
    import torch

    data = random_examples(rows, LENGTH, seed=5)
    data[0] = Example(data[0].ids[:15], (False,) * 6 + (True,) * 9, "padded, prompt masked")
    batch = make_batch(data, 2048)
    ids = np.array(batch.ids)
    labels = np.where(np.concatenate([np.zeros((rows, 1)), np.array(batch.mask)], 1) > 0, ids, -100)
    return batch, torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_loss_and_gradients_match_peft(checkpoint, kind):
    import torch
    from peft import LoraConfig, get_peft_model

    rank, scale = 4, 2.0
    base = torch_model(checkpoint)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=0.0, use_dora=kind == "dora",
                                           target_modules=[k.split(".")[1] for k in PROJECTIONS]))
    ours = load_model(checkpoint)
    ours.freeze()
    apply_adapters(ours, AdapterConfig(kind, -1, rank, scale))
    rng = np.random.RandomState(0)
    for i, layer in enumerate(ours.layers):
        for key in PROJECTIONS:
            mine = layer[key.split(".")[0]][key.split(".")[1]]
            theirs = dict(peft.base_model.model.model.layers[i].named_modules())[key]
            if kind == "dora":  # the magnitude at init: each row's norm of the base weight
                magnitude = theirs.lora_magnitude_vector["default"].weight.detach().numpy()
                assert relative(np.array(mine.m), magnitude) < 1e-6
            a = rng.normal(0, 0.1, mine.lora_a.shape).astype(np.float32)
            b = rng.normal(0, 0.1, mine.lora_b.shape).astype(np.float32)  # nonzero: every gradient is
            mine.lora_a, mine.lora_b = mx.array(a), mx.array(b)
            with torch.no_grad():
                theirs.lora_A["default"].weight.copy_(torch.tensor(a.T))
                theirs.lora_B["default"].weight.copy_(torch.tensor(b.T))
                if kind == "dora":
                    m = magnitude * (1 + rng.normal(0, 0.1, magnitude.shape)).astype(np.float32)
                    mine.m = mx.array(m)
                    theirs.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    batch, ids, labels = batch_and_labels()
    (value, _), grads = nn.value_and_grad(ours, loss)(ours, batch.ids, batch.mask)
    reference = peft(input_ids=ids, labels=labels).loss
    reference.backward()
    assert relative(value.item(), reference.item()) < 1e-5
    grads = dict(tree_flatten(grads))
    names = {"lora_a": "lora_A", "lora_b": "lora_B", "m": "lora_magnitude_vector"}
    checked = 0
    for name, g in grads.items():
        path, leaf = name.rsplit(".", 1)
        module = peft.base_model.model.get_submodule(path)
        torch_grad = getattr(module, names[leaf])["default"].weight.grad.numpy()
        assert relative(np.array(g), torch_grad if leaf == "m" else torch_grad.T) < 1e-4, name
        checked += 1
    assert checked == len(ours.layers) * 7 * (3 if kind == "dora" else 2)


def test_full_fine_tuning_gradients_match_torch_autograd(checkpoint):
    ours = load_model(checkpoint)
    ours.freeze()
    ours.layers[-1].unfreeze()
    reference = torch_model(checkpoint)
    batch, ids, labels = batch_and_labels()
    (value, _), grads = nn.value_and_grad(ours, loss)(ours, batch.ids, batch.mask)
    out = reference(input_ids=ids, labels=labels).loss
    out.backward()
    assert relative(value.item(), out.item()) < 1e-5
    grads = dict(tree_flatten(grads))
    assert len(grads) == 11  # seven projections, four norms
    for name, g in grads.items():
        assert relative(np.array(g), reference.get_parameter(name).grad.numpy()) < 1e-4, name


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_qlora_gradients_equal_lora_over_the_base_dequantized(checkpoint, kind):
    def adapted(quantized: bool):
        model = load_model(checkpoint)
        if quantized:
            nn.quantize(model, group_size=32, bits=4)
        else:  # the same 4-bit weights, dequantized
            nn.quantize(model, group_size=32, bits=4)
            for layer in model.layers:
                for key in PROJECTIONS:
                    parent, name = key.split(".")
                    q = layer[parent][name]
                    plain = nn.Linear(1, 1, bias=False)
                    plain.weight = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4)
                    layer[parent][name] = plain
        model.freeze()
        mx.random.seed(0)
        apply_adapters(model, AdapterConfig(kind, -1, 4, 2.0))
        for _, module in model.named_modules():
            if hasattr(module, "lora_b"):
                module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(1)) * 0.1
        return model

    batch, _, _ = batch_and_labels()
    q, f = adapted(True), adapted(False)
    (vq, _), gq = nn.value_and_grad(q, loss)(q, batch.ids, batch.mask)
    (vf, _), gf = nn.value_and_grad(f, loss)(f, batch.ids, batch.mask)
    assert relative(vq.item(), vf.item()) < 1e-5
    gq, gf = dict(tree_flatten(gq)), dict(tree_flatten(gf))
    assert sorted(gq) == sorted(gf)
    assert max(relative(np.array(gq[k]), np.array(gf[k])) for k in gq) < 1e-4
