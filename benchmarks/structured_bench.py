"""Structured output: what the grammar mask costs a decode step, and how long a schema takes to compile.

    python benchmarks/bench.py make tiny-vocab /tmp/bench-tinyv-bf16     # the tiny layers, Qwen3's vocabulary
    python benchmarks/structured_bench.py /tmp/bench-tinyv-bf16 [--decode-tokens 128] [--trials 3] [--out F]
    python benchmarks/structured_bench.py /tmp/bench-full-bf16 --decode-tokens 8 --trials 1

The mask needs the model's whole vocabulary (151936 logits, the tokenizer's 151669 ids): the plain tiny
shape (vocabulary 1024) cannot take one, so `tiny-vocab` is the tiny layers with Qwen3's vocabulary, a
short step as on a Mac's GPU. Figures (medians over the trials; ours only, mlx-lm has no constraints):

    vocabulary build   GrammarVocabulary from the checkpoint's tokenizer.json, once per loaded model
    schema compile     compile_constraint for each schema of SCHEMAS (with the reasoning block), ms
    mask, advance      GrammarState.mask on one step's logits (llguidance's bitmask on the host, then
                       unpacked and applied with MLX, evaluated) and GrammarState.advance, ms a step,
                       replaying the tokens of a constrained answer
    step free          generate's decode ms a token, greedy, no constraint, the end of turn banned
    step constrained   the same with a JSON schema that cannot complete within --decode-tokens (an array
                       of at least 1000 strings), so both write exactly as many tokens
    share              (constrained - free) / constrained: everything the constraint adds to a step, the
                       mask, the advance and the lost overlap (a constrained step reads its token before the
                       next step can be built; a free one builds step n+1 while step n computes)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import EOS_IDS

SCHEMAS = {
    "flat object": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"]},
    "enum + bounds": {"type": "object", "properties": {
        "unit": {"enum": ["C", "F", "K"]}, "value": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["unit", "value"], "additionalProperties": False},
    "nested arrays": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 5,
                                                                "items": {"type": "object", "properties": {
                                                                    "id": {"type": "integer"},
                                                                    "tags": {"type": "array",
                                                                             "items": {"type": "string"}}},
                                                                    "required": ["id"]}}},
                      "required": ["items"]},
    "patterns": {"type": "object", "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                                                  "code": {"type": "string", "maxLength": 8}},
                 "required": ["date"]},
}
ENDLESS = {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1000}
PROMPT = [{"role": "user", "content": "List as many city names as you can, as a JSON array of strings."}]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()

    import mlx.core as mx

    from qwen3_mlx import GenerationOptions, generate, load
    from qwen3_mlx.text.structured import compile_constraint, grammar_vocabulary

    model, tokenizer = load(a.checkpoint)
    vocab = model.args.vocab_size
    t = time.perf_counter()
    vocabulary = grammar_vocabulary(tokenizer, vocab)  # what the first constrained request builds
    build = time.perf_counter() - t

    compile_ms = {}
    for name, schema in SCHEMAS.items():
        times = []
        for _ in range(max(a.trials, 5)):
            t = time.perf_counter()
            compile_constraint(vocabulary, json_schema=schema, thinking=True)
            times.append(time.perf_counter() - t)
        compile_ms[name] = ms(statistics.median(times))

    banned = {i: float("-inf") for i in EOS_IDS if i < vocab}
    options = GenerationOptions(think=False, temp=0.0, max_tokens=a.decode_tokens, logit_bias=banned)
    steps: dict[str, list[float]] = {"free": [], "constrained": []}
    answer: list[int] = []
    generate(model, tokenizer, PROMPT, options, max_tokens=4)  # warm-up: compile the decode graph
    for trial in range(a.trials):
        order = ["free", "constrained"] if trial % 2 == 0 else ["constrained", "free"]
        for kind in order:
            extra = {"json_schema": ENDLESS} if kind == "constrained" else {}
            r = generate(model, tokenizer, PROMPT, options, **extra)
            assert r.stats.answer_tokens == a.decode_tokens, (kind, r.stats.answer_tokens)
            steps[kind].append(r.stats.decode_seconds / r.stats.decode_tokens)
            if kind == "constrained":
                answer = r.token_ids

    # The mask and the advance alone, replaying the constrained answer's tokens on real logits.
    state = compile_constraint(vocabulary, json_schema=ENDLESS, thinking=False).state()
    logits = model(mx.array([tokenizer.encode("[")]))[0, -1]
    mx.eval(logits)
    mask_t, advance_t = [], []
    for token in answer:
        t = time.perf_counter()
        mx.eval(state.mask(logits))
        t1 = time.perf_counter()
        state.advance(token)
        t2 = time.perf_counter()
        mask_t.append(t1 - t)
        advance_t.append(t2 - t1)

    free, constrained = statistics.median(steps["free"]), statistics.median(steps["constrained"])
    result = {
        "checkpoint": str(a.checkpoint), "device": str(mx.default_device()), "machine": platform.machine(),
        "vocab_size": vocab, "decode_tokens": a.decode_tokens, "trials": a.trials,
        "vocabulary_build_s": round(build, 3), "schema_compile_ms": compile_ms,
        "mask_ms": ms(statistics.median(mask_t)), "advance_ms": ms(statistics.median(advance_t)),
        "step_free_ms": ms(free), "step_constrained_ms": ms(constrained),
        "share": round((constrained - free) / constrained, 4),
        "mask_share": round((statistics.median(mask_t) + statistics.median(advance_t)) / constrained, 4),
    }
    print(f"{a.checkpoint.name} on {result['device']}, vocabulary {vocab}, {a.decode_tokens} tokens, "
          f"{a.trials} trials (medians)\n")
    print("| figure | value |\n| --- | ---: |")
    print(f"| vocabulary build | {result['vocabulary_build_s']} s |")
    for name, value in compile_ms.items():
        print(f"| schema compile: {name} | {value} ms |")
    print(f"| mask a step | {result['mask_ms']} ms |")
    print(f"| advance a step | {result['advance_ms']} ms |")
    print(f"| step free | {result['step_free_ms']} ms |")
    print(f"| step constrained | {result['step_constrained_ms']} ms |")
    print(f"| constraint's share of a step (all it adds) | {result['share']:.1%} |")
    print(f"| mask + advance share of a step | {result['mask_share']:.1%} |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
