"""Retrieval on the Qwen3 layers: embed() (Qwen3-Embedding) and rerank() (Qwen3-Reranker)."""
