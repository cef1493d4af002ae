"""What every API shares below its own mapping: a refusal (ApiError), the sampling parameters, the one
reading of a body into a Submission (a Prompt and GenerationOptions), and a reply's end."""
