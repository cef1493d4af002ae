"""/v1/embeddings, /v1/rerank (/rerank, /v2/rerank) and /score through the clients people use: the openai
SDK, LangChain, httpx and the cohere SDK; the library's numbers; bad bodies a 4xx in OpenAI's error shape."""

import base64

import httpx
import numpy as np
import pytest
from retrieval_checkpoints import make_embedding_checkpoint, make_reranker_checkpoint
from server_live import served

from qwen3_mlx import embed, load, rerank
from qwen3_mlx.generation.engine import Engine

DOCS = ["Beijing is the capital of China.", "Gravity pulls.", "Paris is in France."]


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    model, tokenizer = load(make_embedding_checkpoint(tmp_path_factory.mktemp("e"), num_hidden_layers=1))
    with Engine(model, tokenizer, max_batch=2) as engine, served(engine, "emb") as server:
        yield server, (model, tokenizer)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    model, tokenizer = load(make_reranker_checkpoint(tmp_path_factory.mktemp("r"), num_hidden_layers=1))
    with Engine(model, tokenizer, max_batch=2) as engine, served(engine, "rr") as server:
        yield server, (model, tokenizer)


def test_the_openai_sdk_embeds_texts_token_ids_and_base64(embedding):
    from openai import OpenAI

    server, loaded = embedding
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    got = client.embeddings.create(model="emb", input=["hello", "world"], dimensions=32)
    assert np.abs(np.array([d.embedding for d in got.data]) - np.array(embed(*loaded, ["hello", "world"],
                                                                             dimensions=32))).max() < 1e-6
    ids = loaded[1].encode("hello")
    assert got.usage.prompt_tokens == 2 * (len(ids) + 1)
    by_ids = client.embeddings.create(model="emb", input=[ids])
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.abs(np.array(by_ids.data[0].embedding) - vector).max() < 1e-6


def test_langchain_embeds_through_the_openai_route(embedding):
    from langchain_openai import OpenAIEmbeddings

    server, loaded = embedding
    lc = OpenAIEmbeddings(model="emb", base_url=f"{server.url}/v1", api_key="x", check_embedding_ctx_length=False)
    assert np.abs(np.array(lc.embed_query("hello")) - np.array(embed(*loaded, ["hello"])[0])).max() < 1e-6


def test_rerank_through_httpx_and_cohere(reranker):
    import cohere

    server, loaded = reranker
    expected = rerank(*loaded, "capital of China", DOCS)
    body = httpx.post(f"{server.url}/v1/rerank", json={"query": "capital of China", "documents": DOCS, "top_n": 2,
                                                      "return_documents": True}).json()
    best = sorted(range(3), key=lambda i: -expected[i])
    assert [r["index"] for r in body["results"]] == best[:2]
    assert body["results"][0]["document"]["text"] == DOCS[best[0]] and body["usage"]["total_tokens"] > 0
    client = cohere.ClientV2(api_key="x", base_url=server.url)
    got = client.rerank(model="rr", query="capital of China", documents=DOCS)
    assert [(r.index, r.relevance_score) for r in got.results] == [(i, expected[i]) for i in best]
    score = httpx.post(f"{server.url}/score", json={"text_1": "capital of China", "text_2": DOCS}).json()
    assert [d["score"] for d in score["data"]] == expected


BAD = [("/v1/embeddings", {"input": []}, "input must not be empty"),
       ("/v1/embeddings", {"input": [""]}, r"input\[0\] is empty"),
       ("/v1/embeddings", {"input": [{"a": 1}]}, "input"),
       ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions=8 must be from 32"),
       ("/v1/embeddings", {"input": "x", "dimensions": 65}, "dimensions=65"),
       ("/v1/embeddings", {"input": ["ok", "word " * 1100]}, r"input\[1\] has \d+ tokens, over the model's context"),
       ("/v1/embeddings", {"input": "x", "model": "other"}, "does not exist"),
       ("/v1/rerank", {"query": "q", "documents": ["d"]}, "embedding model: reranking needs")]


@pytest.mark.parametrize("path,body,words", BAD)
def test_bad_embedding_bodies_are_4xx_in_openai_s_shape(embedding, path, body, words):
    import re

    reply = httpx.post(f"{embedding[0].url}{path}", json=body)
    assert 400 <= reply.status_code < 500
    assert re.search(words, reply.json()["error"]["message"])


@pytest.mark.parametrize("path,body,words", [
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 10_000}, "at most 1000"),
    ("/v1/rerank", {"query": "q", "documents": []}, "must not be empty"),
    ("/v1/rerank", {"query": 3, "documents": ["d"]}, "query"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "give one text_1"),
    ("/v1/embeddings", {"input": "x"}, "causal .* embeddings need an embedding checkpoint")])
def test_bad_rerank_bodies_are_4xx_in_openai_s_shape(reranker, path, body, words):
    import re

    reply = httpx.post(f"{reranker[0].url}{path}", json=body)
    assert 400 <= reply.status_code < 500
    assert re.search(words, reply.json()["error"]["message"])
