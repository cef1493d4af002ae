"""Anthropic's Messages API: protocol (pydantic models), mapping (body -> Submission, result -> message),
events (the stream)."""
