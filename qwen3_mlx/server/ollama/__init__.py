"""Ollama's API (/api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps, /api/version) on
the same engine: its pydantic models, its bodies read into the one Submission and results written back,
its NDJSON stream, and the routes that need no engine stream."""
