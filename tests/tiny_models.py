"""Tiny random-weight transformers built from configs, for fast offline tests of methods and loops.
The same config and seed always give the same weights, so a test can rebuild an identical base."""
from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, PretrainedConfig, RobertaConfig

from peftlab.workers.methods import TaskInfo


def tiny_bert_config(**overrides) -> BertConfig:
    """2 layers, hidden 32, intermediate 37 (so d_in != d_out in the feed-forward), 3 labels."""
    kw = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3,
    )
    return BertConfig(**{**kw, **overrides})


def tiny_roberta_config(**overrides) -> RobertaConfig:
    """Another shape and head: 1 layer, hidden 24, 2 labels, a classifier with its own dense layer."""
    kw = dict(
        vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=50,
        num_labels=2, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
    )
    return RobertaConfig(**{**kw, **overrides})


CONFIGS = {"bert": tiny_bert_config, "roberta": tiny_roberta_config}


def build(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A sequence classifier with random weights, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def build_meta(config: PretrainedConfig) -> torch.nn.Module:
    """The same architecture on torch's meta device: shapes and names, no weights."""
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def task_for(config: PretrainedConfig) -> TaskInfo:
    return TaskInfo("text-classification", config.num_labels, ("classifier",))


def batch(config: PretrainedConfig, size: int = 3, seq_len: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (the last row padded), token_type_ids (two segments where the model
    has them) and labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (size, seq_len), generator=g)
    attention_mask = torch.ones(size, seq_len, dtype=torch.long)
    attention_mask[-1, seq_len // 2 :] = 0
    input_ids[attention_mask == 0] = config.pad_token_id
    token_type_ids = torch.zeros(size, seq_len, dtype=torch.long)
    if config.type_vocab_size > 1:
        token_type_ids[:, seq_len // 2 :] = 1
    labels = torch.randint(0, config.num_labels, (size,), generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
