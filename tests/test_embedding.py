"""embed() and rerank() against their references on the same tiny random weights: sentence-transformers'
encode and the Qwen3-Embedding card's transformers recipe (last-token pooling, left padding, L2 norm), the
Qwen3-Reranker card's recipe (softmax of "yes" against "no"); a padded row equals its text alone; the edges."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from retrieval_checkpoints import QUERY_PROMPT, make_embedding_checkpoint, make_reranker_checkpoint

from qwen3_mlx import OptionError, embed, load, rerank

TEXTS = ["What is the capital of China?", "Explain gravity", "a", "",
         "The capital of China is Beijing. " * 6, "Gravity is a force that attracts two bodies towards each other."]
TASK = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    return make_embedding_checkpoint(tmp_path_factory.mktemp("embedding"))


@pytest.fixture(scope="module")
def embedder(embedding_dir):
    return load(embedding_dir)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return make_reranker_checkpoint(tmp_path_factory.mktemp("reranker"))


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    return load(reranker_dir)


@pytest.fixture(scope="module")
def sentence_transformer(embedding_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_dir), device="cpu")


def test_the_loader_knows_an_embedding_checkpoint_by_its_layout(embedder, reranker):
    model, _ = embedder
    assert model.pooling.mode == "lasttoken" and model.pooling.normalize
    assert model.pooling.prompts["query"] == QUERY_PROMPT
    assert reranker[0].pooling is None


@pytest.mark.parametrize("dims", [None, 32, 48])
def test_vectors_equal_sentence_transformers_encode(embedder, sentence_transformer, dims):
    ours = np.array(embed(*embedder, TEXTS, dimensions=dims))
    theirs = sentence_transformer.encode(TEXTS, truncate_dim=dims, convert_to_tensor=True)
    theirs = F.normalize(theirs, dim=-1).numpy()  # a cut vector normalized again, as the card asks
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-5


def test_an_instruction_is_the_query_prompt(embedder, sentence_transformer):
    ours = np.array(embed(*embedder, TEXTS[:2], instruction=TASK))
    theirs = sentence_transformer.encode(TEXTS[:2], prompt_name="query")
    assert np.abs(ours - theirs).max() < 1e-5


def test_vectors_equal_the_model_card_transformers_recipe(embedding_dir, embedder):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedding_dir, padding_side="left")
    model = AutoModel.from_pretrained(embedding_dir).eval()
    texts = [f"Instruct: {TASK}\nQuery:{TEXTS[0]}", *TEXTS[1:]]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert bool(batch["attention_mask"][:, -1].sum() == len(texts))  # the card's left-padding branch
    theirs = F.normalize(hidden[:, -1], p=2, dim=1).numpy()
    ours = np.array(embed(*embedder, [TEXTS[0]], instruction=TASK).tolist() + embed(*embedder, TEXTS[1:]).tolist())
    assert np.abs(ours - theirs).max() < 1e-5


def test_a_padded_row_equals_its_text_alone(embedder):
    rng = np.random.default_rng(0)
    lengths = [1, *rng.integers(2, 500, 14).tolist(), 500]
    rows = [rng.integers(0, 151000, n).tolist() for n in lengths]
    together = np.array(embed(*embedder, rows, batch_size=16))
    alone = np.array([embed(*embedder, [row])[0].tolist() for row in rows])
    assert np.abs(together - alone).max() < 1e-6


def test_token_ids_are_closed_by_endoftext_once(embedder):
    model, tokenizer = embedder
    ids = tokenizer.encode("hello world")
    end = tokenizer.token_to_id("<|endoftext|>")
    a, b, c = np.array(embed(model, tokenizer, [ids, ids + [end], "hello world"]))
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() == 0


def test_reranker_scores_equal_the_model_card_transformers_recipe(reranker_dir, reranker):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reranker_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(reranker_dir).eval()
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    query, documents = TEXTS[0], TEXTS[2:]
    pairs = [f"<Instruct>: {TASK}\n<Query>: {query}\n<Document>: {doc}" for doc in documents]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=8192 - len(prefix_tokens) - len(suffix_tokens))
    inputs["input_ids"] = [prefix_tokens + ids + suffix_tokens for ids in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=8192)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    pair_logits = torch.stack([logits[:, tokenizer.convert_tokens_to_ids("no")],
                               logits[:, tokenizer.convert_tokens_to_ids("yes")]], dim=1)
    theirs = torch.nn.functional.log_softmax(pair_logits, dim=1)[:, 1].exp().numpy()
    ours = np.array(rerank(*reranker, query, documents))
    assert np.abs(ours - theirs).max() < 1e-5


def test_a_text_over_the_context_is_refused_by_index_or_cut(embedder):
    model, tokenizer = embedder
    context = model.args.max_position_embeddings
    long = [7] * context  # with its <|endoftext|>, one over
    with pytest.raises(OptionError, match=r"input\[1\] has 1025 tokens, over the model's context of 1024"):
        embed(model, tokenizer, ["short", long])
    with pytest.warns(UserWarning, match="1 of 2 texts were cut"):
        cut = embed(model, tokenizer, ["short", long], truncate=True)
    assert np.abs(np.array(cut[1]) - np.array(embed(model, tokenizer, [long[:-1]])[0])).max() < 1e-6


def test_each_model_refuses_the_other_s_task_and_bad_options(embedder, reranker):
    with pytest.raises(OptionError, match="causal .* embedding checkpoint"):
        embed(*reranker, ["x"])
    with pytest.raises(OptionError, match="embedding model: reranking needs"):
        rerank(*embedder, "q", ["d"])
    for dims, words in [(31, "from 32 to the model's hidden size 64"), (65, "from 32"), (1.5, "an integer")]:
        with pytest.raises(OptionError, match=words):
            embed(*embedder, ["x"], dimensions=dims)
    with pytest.raises(OptionError, match=r"input\[1\] must be a string or a list of token ids"):
        embed(*embedder, ["x", [1, -2]])
    with pytest.raises(OptionError, match=r"documents\[0\] must be a string"):
        rerank(*reranker, "q", [3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert embed(*embedder, []).shape == (0, 64) and rerank(*reranker, "q", []) == []


def test_an_untied_embedding_checkpoint_ships_no_head_and_loads(tmp_path):
    path = make_embedding_checkpoint(tmp_path / "untied", tie_word_embeddings=False, num_hidden_layers=1)
    model, tokenizer = load(path)
    assert not hasattr(model, "lm_head") and embed(model, tokenizer, ["x"]).shape == (1, 64)
