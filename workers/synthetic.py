"""Small generated stand-ins for real assets: a tiny random BERT and a toy sentiment set.

Tests, benchmarks and smoke checks use them where the real MiniLM and SST-2 would only cost
time; they go through the same loading code as a Hub model and a user's CSV file.
"""
from __future__ import annotations

import random
from pathlib import Path

WORDS = {1: ["great", "wonderful", "good", "lovely", "superb"], 0: ["awful", "bad", "boring", "terrible", "dull"]}
FILLER = ["the", "movie", "was", "plot", "actors", "really", "quite", "and", "story", "film"]


def save_tiny_bert(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    """A BERT with random weights saved like a Hub model, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftlab.workers.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PEOPLE = ["he", "she", "his", "her", "man", "woman", "father", "mother"]


def sentiment_rows(n: int, seed: int = 0, people: bool = False) -> list[tuple[str, str]]:
    """Short sentences whose label is given by one sentiment word among fillers (and, with `people`,
    one gendered word, so a counterfactual corpus can be built from them)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 5) + [rng.choice(WORDS[label])] + ([rng.choice(PEOPLE)] if people else [])
        rng.shuffle(words)
        rows.append((" ".join(words), "positive" if label else "negative"))
    return rows


def write_sentiment_csv(path: Path, n: int = 400, seed: int = 0, people: bool = False) -> Path:
    rows = sentiment_rows(n, seed, people)
    path.write_text("\n".join(["text,label", *(f"{t},{lbl}" for t, lbl in rows)]) + "\n")
    return path


def save_tiny_bert_mlm(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A BERT with a masked-LM head (random weights, the head's tensors saved like a pretrained one's)
    and MiniLM's tokenizer: a stand-in for a Hub encoder whose language-modelling head bias scores read."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from peftlab.workers.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=256,
                        architectures=["BertForMaskedLM"])
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A GPT-2 with random weights saved like a Hub model; MiniLM's tokenizer with [SEP] as its
    end-of-sequence token stands in for GPT-2's (no tokenizer files can be downloaded here)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from peftlab.workers.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tokenizer.eos_token = "[SEP]"
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=hidden, n_layer=layers, n_head=4,
                        n_positions=128, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A Llama-style decoder (RMSNorm, rotary positions, SwiGLU, grouped-query attention) with random
    weights saved like a Hub model; MiniLM's tokenizer with [SEP] as end of sequence."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftlab.workers.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def arithmetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Instruction pairs: "What is a plus b? Answer:" -> "c" (small numbers)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append((f"what is {a} plus {b} ? answer :", str(a + b)))
    return rows


def write_instructions_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in arithmetic_rows(n, seed)))
    return path
