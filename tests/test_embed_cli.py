"""`qwen3-mlx embed` and `qwen3-mlx rerank`: the library's numbers, in the input's order or by score."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from retrieval_checkpoints import make_embedding_checkpoint, make_reranker_checkpoint

from qwen3_mlx import embed, load, rerank
from qwen3_mlx.cli import main


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return make_embedding_checkpoint(root / "embedding", num_hidden_layers=1), \
        make_reranker_checkpoint(root / "reranker", num_hidden_layers=1)


def test_embed_prints_one_line_per_text_in_order(paths, tmp_path):
    texts = ["hello", "a longer text than the first one", "x"]
    source = tmp_path / "in.jsonl"
    source.write_text(f"{texts[0]}\n\n{json.dumps({'text': texts[1]})}\n{texts[2]}\n")
    result = CliRunner().invoke(main, ["embed", "--model", str(paths[0]), "-i", str(source), "--dimensions", "32",
                                       "--instruction", "Find it"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    expected = np.array(embed(*load(paths[0]), texts, dimensions=32, instruction="Find it"))
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert np.abs(np.array([line["embedding"] for line in lines]) - expected).max() < 1e-6


def test_embed_writes_npy_to_a_file_only(paths, tmp_path):
    out = tmp_path / "v.npy"
    result = CliRunner().invoke(main, ["embed", "--model", str(paths[0]), "--format", "npy", "-o", str(out)],
                                input="one\ntwo\n")
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (2, 64)
    refused = CliRunner().invoke(main, ["embed", "--model", str(paths[0]), "--format", "npy"], input="one\n")
    assert refused.exit_code == 2 and "--format npy needs --output FILE" in refused.output


def test_rerank_prints_the_best_first(paths, tmp_path):
    docs = ["Beijing is the capital of China.", "Gravity pulls.", "Paris is in France."]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    result = CliRunner().invoke(main, ["rerank", "--model", str(paths[1]), "--query", "capital of China",
                                       "--documents", str(tmp_path / "docs.txt"), "--top-n", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    scores = rerank(*load(paths[1]), "capital of China", docs)
    best = sorted(range(3), key=lambda i: -scores[i])[:2]
    assert [line["index"] for line in lines] == best
    assert [line["relevance_score"] for line in lines] == [scores[i] for i in best]


def test_each_command_refuses_the_other_model(paths):
    wrong = CliRunner().invoke(main, ["embed", "--model", str(paths[1])], input="x\n")
    assert wrong.exit_code == 2 and "embeddings need an embedding checkpoint" in wrong.output
    wrong = CliRunner().invoke(main, ["rerank", "--model", str(paths[0]), "--query", "q", "--documents", "-"],
                               input="x\n")
    assert wrong.exit_code == 2 and "reranking needs a causal checkpoint" in wrong.output
