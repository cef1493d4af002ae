"""qwen3-mlx: Qwen3 dense language models in MLX.

    from qwen3_mlx import load, generate, stream_generate, GenerationOptions
    model, tokenizer = load("mlx-community/Qwen3-1.7B-4bit")
    result = generate(model, tokenizer, "Why is the sky blue?", thinking_budget=256)
    print(result.reasoning, result.content)
    result = generate(model, tokenizer, "And at sunset?", GenerationOptions(think=False, seed=0))
    result = generate(model, tokenizer, Prompt("Hi", system="Be brief."), max_tokens=64)   # a request's parts
"""

from .checkpoint.converter import convert
from .checkpoint.loader import load
from .embedding.embed import embed
from .embedding.rerank import rerank
from .errors import ConfigError, OptionError, Qwen3Error
from .evaluation.perplexity import perplexity
from .generation.batch import batch_generate
from .generation.chat import ChatSession
from .generation.engine import Engine
from .generation.options import REASONING_EFFORTS, EngineOptions, GenerationOptions
from .generation.response import GenerationResult, GenerationStats
from .generation.single import generate, stream_generate
from .text.prompt import Prompt
from .text.tool_grammar import tool_call_grammar
from .text.tools import ToolCall, parse_tool_calls
from .training.fuse import fuse
from .training.loop import train
from .training.options import TrainingOptions, TrainingReport, TrainingResult

__all__ = ["load", "convert", "generate", "stream_generate", "batch_generate", "Engine", "ChatSession",
           "GenerationOptions", "EngineOptions", "REASONING_EFFORTS", "Prompt", "GenerationResult", "GenerationStats",
           "ToolCall", "parse_tool_calls", "tool_call_grammar", "embed", "rerank", "perplexity", "Qwen3Error",
           "ConfigError", "OptionError", "train", "fuse", "TrainingOptions", "TrainingReport", "TrainingResult"]
