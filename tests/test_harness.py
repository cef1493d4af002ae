"""lm-eval on our model: each request's loglikelihood equals lm-eval's own hf model's on the same weights
and our perplexity's sum, generate_until writes the same text, a local task (YAML over JSONL) run by
`qwen3-mlx eval` gives the hf model's metrics; lm-eval's own models stay registered beside ours."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from qwen3_mlx.cli import commands  # noqa: E402
from qwen3_mlx.evaluation.documents import Document  # noqa: E402
from qwen3_mlx.evaluation.harness import Qwen3LM  # noqa: E402
from qwen3_mlx.evaluation.perplexity import perplexity, total_nll  # noqa: E402

MAX_LENGTH = 24
PAIRS = [("Question: Is 2 even?\nAnswer:", " yes"), ("Question: Is 2 even?\nAnswer:", " no"),
         ("The cat sat on the", " mat and purred"), ("The cat sat on the", " sofa"), ("Trailing space ", "here"), ("", "Hello world"),
         (" ".join(["long"] * 40), " context, cut to the last tokens")]
TEXTS = ["A short one.", " ".join(f"Line {i}: the tree holds {i * 7 % 13} birds." for i in range(8))]


@pytest.fixture(scope="module")
def ours(tiny):
    return Qwen3LM(*tiny, batch_size=3, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint, tok):
    return get_model("hf")(pretrained=str(tiny_checkpoint), dtype="float32", device="cpu", batch_size=3,
                           max_length=MAX_LENGTH, prefix_token_id=tok.token_to_id("<|endoftext|>"))


def requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def test_lm_evals_own_models_stay_registered_beside_ours():
    assert get_model("qwen3-mlx") is Qwen3LM and get_model("hf").__name__ == "HFLM"


def test_loglikelihoods_equal_lm_evals_hf_model_and_our_perplexitys_sums(ours, hf, tiny):
    model, tokenizer = tiny
    got = ours.loglikelihood(requests("loglikelihood", PAIRS))
    want = hf.loglikelihood(requests("loglikelihood", PAIRS))
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-5, abs=1e-4)
    for (context, continuation), (ll, _) in zip(PAIRS[:4], got):
        whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
        scored = [i >= len(head) for i in range(len(whole))]
        total, tokens = total_nll(model, [Document(whole, scored)], MAX_LENGTH, MAX_LENGTH, 1)
        assert (tokens, ll) == (len(whole) - len(head), pytest.approx(-total, rel=1e-5))


def test_rolling_loglikelihoods_equal_lm_evals_and_our_perplexity(ours, hf, tiny):
    model, tokenizer = tiny
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    assert got == pytest.approx(hf.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS])),
                                rel=1e-5)
    for text, ll in zip(TEXTS, got):
        ids = [tokenizer.token_to_id("<|endoftext|>")] + tokenizer.encode(text)  # every token of the text scored
        result = perplexity(model, tokenizer, [ids], context=MAX_LENGTH)
        assert ll == pytest.approx(-result.nll * result.tokens, rel=1e-5)


def test_generate_until_writes_what_lm_evals_hf_model_writes(ours, hf):
    asked = [("Question: Is 3 even?\nAnswer:", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),
             ("Once upon a time", {"until": ["."], "max_gen_toks": 8}), ("Hi", {"until": "x", "max_gen_toks": 3})]
    got = ours.generate_until(requests("generate_until", asked))
    assert got == hf.generate_until(requests("generate_until", asked)) and all(got)


def write_tasks(folder):
    rows = [{"question": f"Is {i} even?", "choices": [" yes", " no"], "answer": i % 2} for i in range(4)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
              'test_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n')
    (folder / "mc.yaml").write_text("task: tiny_mc\n" + common + "output_type: multiple_choice\n"
                                    'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                                    "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text("task: tiny_gen\n" + common + "output_type: generate_until\n"
                                     'doc_to_target: "{{choices[answer]}}"\n'
                                     'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
                                     "metric_list:\n  - metric: exact_match\n")


def test_a_local_task_through_the_command_gives_the_hf_models_metrics(tiny_checkpoint, hf, tmp_path):
    write_tasks(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(commands.main, ["eval", "--model", str(tiny_checkpoint), "--tasks", "tiny_mc,tiny_gen",
                                                "--include-path", str(tmp_path), "--output-path", str(out),
                                                "--log-samples", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "tiny_mc" in result.stdout and "acc" in result.stdout
    ran = json.loads((out / "results.json").read_text())["results"]
    want = simple_evaluate(model=hf, tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
                           log_samples=True)
    assert {t: (r["acc,none"] if "acc,none" in r else r["exact_match,none"]) for t, r in ran.items()} == {
        "tiny_mc": want["results"]["tiny_mc"]["acc,none"], "tiny_gen": want["results"]["tiny_gen"]["exact_match,none"]}
    samples = [json.loads(line) for line in (out / "samples_tiny_mc.jsonl").read_text().splitlines()]
    assert [s["resps"][0][0][0] for s in samples] == pytest.approx(
        [s["resps"][0][0][0] for s in want["samples"]["tiny_mc"]], rel=1e-5)


def test_an_unknown_task_and_thinking_without_the_template_are_refused(tiny_checkpoint, tmp_path):
    run = CliRunner().invoke
    result = run(commands.main, ["eval", "--model", str(tiny_checkpoint), "--tasks", "no_such_task",
                                 "--include-path", str(tmp_path)])
    assert (result.exit_code, result.stderr) == (1, f"error: unknown task no_such_task: not one of lm-eval's nor "
                                                    f"under {tmp_path}\n")
    result = run(commands.main, ["eval", "--tasks", "x", "--think"])
    assert result.exit_code == 2 and "--think and --thinking-budget need --apply-chat-template" in result.stderr
