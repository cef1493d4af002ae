"""The Qwen3 model and its caches: config, the plain model, KV caches (plain, rotating, batched,
quantized), and the module swaps that speed it up (fast) or shard it over ranks (parallel).
"""
