"""`qwen3-mlx eval`: lm-eval's tasks on a model (lm-eval's own CLI cannot load another package's model),
with lm-eval's option names."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import Qwen3Error
from .display import user_errors
from .options import CONTEXT, THINKING_BUDGET, model_option, version


@click.command("eval", context_settings=CONTEXT)
@model_option
@click.option("--tasks", required=True, metavar="T[,T...]",
              help="lm-eval task names, or those of task YAML files under --include-path (offline: tasks whose "
                   "data is local or cached).")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR",
              help="A folder of task YAML files (over JSONL data, say) beside lm-eval's own.")
@click.option("--output-path", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write results.json there (and samples_TASK.jsonl with --log-samples).")
@click.option("--log-samples", is_flag=True, help="Keep every document's requests and responses.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, metavar="B",
              help="Requests computed together.")
@click.option("--limit", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="The first N documents of each task (below 1: that share of them).")
@click.option("--num-fewshot", type=click.IntRange(min=0), metavar="K", help="Examples before each question.")
@click.option("--apply-chat-template", is_flag=True,
              help="Write each context as chat turns (few-shot examples as earlier turns).")
@click.option("--think/--no-think", default=False, show_default=True,
              help="With --apply-chat-template: Qwen3's thinking mode; generated answers are scored without "
                   "their reasoning.")
@THINKING_BUDGET
@user_errors
@version
def evaluate(model: str, tasks: str, include_path: Path | None, output_path: Path | None, log_samples: bool,
             batch_size: int, limit: float | None, num_fewshot: int | None, apply_chat_template: bool, think: bool,
             thinking_budget: int | None) -> None:
    """Run lm-eval's TASKS on --model and print lm-eval's table of their metrics."""
    try:
        from lm_eval.utils import make_table
    except ImportError:
        raise Qwen3Error("qwen3-mlx eval runs lm-eval, which is not installed: pip install 'qwen3-mlx[eval]'") from None

    from ..evaluation.harness import evaluate as run_tasks
    from ..evaluation.harness import write_results

    if output_path is None and log_samples:
        raise click.UsageError("--log-samples needs --output-path DIR to write the samples into")
    if (think or thinking_budget is not None) and not apply_chat_template:
        raise click.UsageError("--think and --thinking-budget need --apply-chat-template: thinking is a chat mode")
    results = run_tasks(model, [t.strip() for t in tasks.split(",") if t.strip()], include_path=include_path,
                        num_fewshot=num_fewshot, limit=int(limit) if limit and limit >= 1 else limit,
                        batch_size=batch_size, apply_chat_template=apply_chat_template, think=think,
                        thinking_budget=thinking_budget, log_samples=log_samples)
    click.echo(make_table(results))
    if output_path is not None:
        for path in write_results(results, output_path):
            click.echo(f"wrote {path}", err=True)
