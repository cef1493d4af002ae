"""Device-specific behaviour: the Metal path (faked here, where there is no Metal) and any thread."""

import gc
import threading

import mlx.core as mx
import pytest

from qwen3_mlx import device, generate, load


@pytest.fixture
def fake_metal(monkeypatch):
    """Metal's device information, and a record of the wired limits set."""
    limits = []

    def set_wired_limit(n):
        limits.append(n)
        return 7 if len(limits) == 1 else limits[-2]

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda *a: {"max_recommended_working_set_size": 123 * 2**20})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    return limits


def test_on_metal_the_wired_limit_is_held_while_a_model_lives(tiny_checkpoint, fake_metal):
    first, _ = load(tiny_checkpoint)
    second, _ = load(tiny_checkpoint)
    assert fake_metal == [123 * 2**20]  # raised once, whatever the number of models
    del first
    gc.collect()
    assert fake_metal == [123 * 2**20]
    del second
    gc.collect()
    assert fake_metal == [123 * 2**20, 7]  # the previous limit, once the last model is gone


def test_off_metal_the_wired_limit_is_left_alone(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: pytest.fail("the wired limit was set"))
    model, _ = load(tiny_checkpoint)
    del model
    gc.collect()


def test_on_metal_generation_runs_on_a_stream_of_its_own(tiny_checkpoint, fake_metal):
    model, tok = load(tiny_checkpoint)
    expected = generate(model, tok, "hi", max_tokens=5, temp=0, think=False).token_ids
    streams = []
    real = mx.stream

    def spy(s):
        streams.append(s)
        return real(s)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mx, "stream", spy)
        with device.generation_stream():
            pass
        got = generate(model, tok, "hi", max_tokens=5, temp=0, think=False).token_ids
    assert isinstance(streams[0], mx.ThreadLocalStream)
    assert streams.count(streams[0]) > 1  # the generation used it too
    assert got == expected


def test_a_model_loaded_in_one_thread_generates_in_others(tiny_checkpoint):
    model, tok = load(tiny_checkpoint)
    expected = generate(model, tok, "hi", max_tokens=6, temp=0, think=False).token_ids
    results, errors = [], []

    def run():
        try:
            results.append(generate(model, tok, "hi", max_tokens=6, temp=0, think=False).token_ids)
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's error
            errors.append(e)
        finally:
            mx.clear_streams()  # MLX's rule for a thread that ran work: else the process may abort at exit

    for _ in range(2):  # a second thread after the first has run and ended
        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert errors == [] and results == [expected, expected]


def test_a_model_loaded_and_used_in_a_second_thread_after_another(tiny_checkpoint):
    out = []

    def run():
        model, tok = load(tiny_checkpoint)
        out.append(generate(model, tok, "hi", max_tokens=4, temp=0, think=False).token_ids)
        mx.clear_streams()

    for _ in range(2):
        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert len(out) == 2 and out[0] == out[1]
