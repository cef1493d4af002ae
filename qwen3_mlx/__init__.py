"""qwen3-mlx: Qwen3 dense language models in MLX.

    from qwen3_mlx import load, generate, stream_generate, GenerationOptions
    model, tokenizer = load("mlx-community/Qwen3-1.7B-4bit")
    result = generate(model, tokenizer, "Why is the sky blue?", thinking_budget=256)
    print(result.reasoning, result.content)
    result = generate(model, tokenizer, "And at sunset?", GenerationOptions(think=False, seed=0))
    result = generate(model, tokenizer, Prompt("Hi", system="Be brief."), max_tokens=64)   # a request's parts
"""

from .batch import batch_generate
from .engine import Engine
from .errors import ConfigError, OptionError, Qwen3Error
from .generation import GenerationResult, GenerationStats, generate, stream_generate
from .loader import load
from .options import GenerationOptions
from .prompt import Prompt

__all__ = ["load", "generate", "stream_generate", "batch_generate", "Engine", "GenerationOptions", "Prompt",
           "GenerationResult", "GenerationStats", "Qwen3Error", "ConfigError", "OptionError"]
