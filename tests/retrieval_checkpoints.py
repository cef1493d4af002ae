"""Tiny random checkpoints in Qwen3-Embedding's and Qwen3-Reranker's layouts, with the real Qwen3 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from checkpoints import QWEN_VOCAB, make_checkpoint, make_model, tokenizer_dir

QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
SHAPE = dict(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def _tokenizer(path: Path, end_text: bool) -> None:
    for f in tokenizer_dir().iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copy(f, path / f.name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"  # as both cards' tokenizers are loaded
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if end_text:  # Qwen3-Embedding's tokenizer.json closes every text with <|endoftext|> (151643)
        tok = json.loads((path / "tokenizer.json").read_text())
        end = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}
        tok["post_processor"] = {"type": "Sequence", "processors": [tok["post_processor"], {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
            "special_tokens": end}]}
        (path / "tokenizer.json").write_text(json.dumps(tok))


def make_embedding_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Qwen3Model's weights without lm_head or "model.", config.json naming Qwen3ForCausalLM (as the real
    one does), and sentence-transformers' modules: the model, last-token pooling, normalization."""
    path.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPE, **overrides}
    make_model(seed, **shape).model.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["Qwen3ForCausalLM"], eos_token_id=151643)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer(path, end_text=True)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": shape["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}))
    (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 1024, "do_lower_case": False}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"}))
    return path


def make_reranker_checkpoint(path: Path, seed: int = 1, **overrides) -> Path:
    """A plain Qwen3ForCausalLM, as Qwen3-Reranker ships."""
    path.mkdir(parents=True, exist_ok=True)
    make_checkpoint(path, seed=seed, tokenizer=True, **{**SHAPE, **overrides})
    _tokenizer(path, end_text=False)
    return path
