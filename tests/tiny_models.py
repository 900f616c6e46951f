"""Tiny random-weight transformers built from configs, for fast offline tests of methods and loops:
BERT-style encoders, a ViT, GPT-2 and a Llama-style decoder, each as a classifier. The same config and
seed always give the same weights, so a test can rebuild an identical base."""
from __future__ import annotations

import torch
from transformers import (AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig,
                          GPT2Config, LlamaConfig, PretrainedConfig, RobertaConfig, ViTConfig)

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


def tiny_vit_config(**overrides) -> ViTConfig:
    """2 layers, hidden 32, MLP 37, 8x8 RGB images in 4x4 patches (4 patches and CLS), 3 labels."""
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=8,
              patch_size=4, num_channels=3, num_labels=3)
    return ViTConfig(**{**kw, **overrides})


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """2 blocks, width 32 (Conv1D layers, MLP 128), 3 labels read at the last real token."""
    kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, num_labels=3, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    return GPT2Config(**{**kw, **overrides})


def tiny_llama_config(**overrides) -> LlamaConfig:
    """2 blocks, width 32, 4 heads over 2 key/value heads, gated MLP 37 (RMSNorm, rotary), 3 labels."""
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=37, vocab_size=100, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**kw, **overrides})


CONFIGS = {"bert": tiny_bert_config, "roberta": tiny_roberta_config}
"""The shapes every contract row runs on."""
ARCHITECTURE_CONFIGS = {"vit": tiny_vit_config, "gpt2": tiny_gpt2_config, "llama": tiny_llama_config}
"""The other architectures, for the rows of methods made for them."""
ALL_CONFIGS = {**CONFIGS, **ARCHITECTURE_CONFIGS}
HEADS = {"gpt2": ("score",), "llama": ("score",)}


def _auto(config: PretrainedConfig):
    return AutoModelForImageClassification if config.model_type == "vit" else AutoModelForSequenceClassification


def build(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A classifier with random weights, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    return _auto(config).from_config(config).eval()


def build_meta(config: PretrainedConfig) -> torch.nn.Module:
    """The same architecture on torch's meta device: shapes and names, no weights."""
    with torch.device("meta"):
        return _auto(config).from_config(config)


def head_names(config: PretrainedConfig) -> tuple[str, ...]:
    return HEADS.get(config.model_type, ("classifier",))


def task_for(config: PretrainedConfig) -> TaskInfo:
    kind = "image-classification" if config.model_type == "vit" else "text-classification"
    return TaskInfo(kind, config.num_labels, head_names(config))


def batch(config: PretrainedConfig, size: int = 3, seq_len: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (the last row padded), token_type_ids (two segments where the model
    has them) and labels; for a ViT, pixel_values and labels."""
    g = torch.Generator().manual_seed(seed)
    if config.model_type == "vit":
        pixels = torch.randn(size, config.num_channels, config.image_size, config.image_size, generator=g)
        return dict(pixel_values=pixels, labels=torch.randint(0, config.num_labels, (size,), generator=g))
    input_ids = torch.randint(3, config.vocab_size, (size, seq_len), generator=g)
    attention_mask = torch.ones(size, seq_len, dtype=torch.long)
    attention_mask[-1, seq_len // 2 :] = 0
    input_ids[attention_mask == 0] = config.pad_token_id
    token_type_ids = torch.zeros(size, seq_len, dtype=torch.long)
    if getattr(config, "type_vocab_size", 1) > 1:
        token_type_ids[:, seq_len // 2 :] = 1
    labels = torch.randint(0, config.num_labels, (size,), generator=g)
    if config.model_type in ("gpt2", "llama"):
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)


TINY_WORDS = ("he she him her his hers man woman men women boy girl father mother son daughter brother sister "
              "king queen is was a the doctor nurse went home said that works with likes to read black white "
              "asian people city good bad movie").split()
TINY_TEXTS = ["he is a doctor", "she is a nurse", "the man went home", "his sister likes to read",
              "a good movie", "the king said that she works", "black people live in the city", "the bad movie"]
"""Sentences in TINY_WORDS, some with gender or race words (a counterfactual corpus for stage-1 methods)."""


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny configs' vocabulary of 100 (pad 0, bos 1, eos 2,
    [CLS] 3, [SEP] 4, [MASK] 5, [UNK] 6, then the words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
    vocab = {token: i for i, token in enumerate([*specials, *TINY_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 3), ("[SEP]", 4)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token="[UNK]")
