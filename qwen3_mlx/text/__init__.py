"""Text in and out: the tokenizer and chat template, a request's prompt made into ids, tool calls
parsed from the text, and grammars (llguidance) for structured output.
"""
