"""Retrieval over HTTP: OpenAI's /v1/embeddings, the rerank shape vLLM, Jina and Cohere share, vLLM's /score."""
