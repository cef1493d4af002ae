"""What a checkpoint is worth: perplexity over sliding windows (perplexity.py) of the texts a data file
holds (documents.py), and lm-eval's harness run on the engine.
"""
