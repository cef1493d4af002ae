"""qwen3-mlx: Qwen3 dense language models in MLX.

    from qwen3_mlx import load, generate, stream_generate, GenerationOptions
    model, tokenizer = load("mlx-community/Qwen3-1.7B-4bit")
    result = generate(model, tokenizer, "Why is the sky blue?", thinking_budget=256)
    print(result.reasoning, result.content)
    result = generate(model, tokenizer, "And at sunset?", GenerationOptions(think=False, seed=0))
    result = generate(model, tokenizer, Prompt("Hi", system="Be brief."), max_tokens=64)   # a request's parts
"""

from .checkpoint.loader import load
from .errors import ConfigError, OptionError, Qwen3Error
from .generation.batch import batch_generate
from .generation.engine import Engine
from .generation.options import GenerationOptions
from .generation.single import (
           GenerationResult,
           GenerationStats,
           generate,
           stream_generate,
)
from .text.prompt import Prompt

__all__ = ["load", "generate", "stream_generate", "batch_generate", "Engine", "GenerationOptions", "Prompt",
           "GenerationResult", "GenerationStats", "Qwen3Error", "ConfigError", "OptionError"]
