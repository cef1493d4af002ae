"""OpenAI's Responses API: protocol (pydantic models), mapping (items -> Submission, result -> output
items), events (the stream), store (finished responses for previous_response_id)."""
