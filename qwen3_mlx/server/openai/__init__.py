"""OpenAI's chat and text completions: protocol (pydantic models), mapping (body -> Submission, result ->
body), events (the stream)."""
