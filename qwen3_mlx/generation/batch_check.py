"""A batch's requests checked before any runs: each one prepared as batch_generate will prepare it,
so that a bad one is named by where it came from (a file's line) before anything is generated."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..errors import Qwen3Error
from ..model.model import Model
from ..text.prompt import Prompt
from ..text.tokenizer import Tokenizer
from .options import GenerationOptions
from .job import prepare


def check_requests(model: Model, tokenizer: Tokenizer,
                   requests: Sequence[tuple[str, Prompt, GenerationOptions]]) -> None:
    """Prepare every request (its prompt encoded and fitted to the context, its sampling checked).

    Args:
        requests: (where, prompt, options) each; `where` names it in an error ("FILE:LINE").

    Raises:
        Qwen3Error: the first bad request's, as "where: the problem".
    """
    with warnings.catch_warnings():  # batch_generate gives them, once
        warnings.simplefilter("ignore")
        for where, prompt, options in requests:
            try:
                prepare(model, tokenizer, prompt, options)
            except Qwen3Error as e:
                raise Qwen3Error(f"{where}: {e}") from None
