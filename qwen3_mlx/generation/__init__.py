"""One request's way through the model, and many at once: options, logits to token, the single
stream, speculative decoding, batches, the scheduler, the chat session and the engine thread.
"""
