"""Small backbones peftlab pretrains itself, for machines that cannot download one: a Llama-style
decoder (next token on the registry's text training splits) and a ViT (MNIST digits, supervised).

Each is a Hugging Face folder under the cache (`peftlab pretrain NAME` builds it, deterministically),
usable as `model: NAME` in a spec like any Hub model. They are small stand-ins, not rivals of real
pretrained models: a comparison on them says how methods behave on those architectures.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab import settings
from peftlab.errors import UserError

STAMP = "peftlab_backbone.json"
"""Written last into a built folder: what was built, how, and how well it fits its data."""
MAX_STEPS = 100_000
Progress = Callable[[int, int, float], None]
"""(step, steps, loss) after each optimizer step."""


@dataclass(frozen=True)
class Backbone:
    name: str
    summary: str
    steps: int
    """Optimizer steps of the recipe."""
    recipe: int
    """Bumped whenever the recipe changes: a folder built by another recipe is rebuilt, not used."""
    build: Callable[[Path, Path | None, int, Progress], dict]
    """(folder, data dir, steps, progress) -> the figures for the stamp."""


def _seed() -> None:
    torch.manual_seed(0)


def _decoder_corpus(data_dir: Path | None) -> tuple[list[str], dict[str, int]]:
    """The training splits (as the tasks carve them) of the registry's text sets: a decoder that
    never saw their validation or test sentences."""
    from peftlab.workers.data import load_text_classification

    texts, sizes = [], {}
    for name in DECODER_SOURCES:
        train = load_text_classification(name, data_dir=data_dir).train_texts
        texts += train
        sizes[name] = len(train)
    return texts, sizes


def _train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE fitted to the corpus: every string encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _fit(model: torch.nn.Module, batches, loss_of: Callable, steps: int, lr: float, progress: Progress) -> list[float]:
    """AdamW with warmup and cosine decay; the losses of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    model.train()
    losses = []
    for step in range(steps):
        loss = loss_of(model, next(batches))
        if not torch.isfinite(loss):
            raise UserError(f"pretraining diverged at step {step + 1}: loss {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress(step + 1, steps, losses[-1])
    return losses


def _loss_ends(losses: list[float]) -> dict[str, float]:
    """Mean losses of the first and the last steps (a quarter of them, at most 20 each)."""
    n = max(1, min(20, len(losses) // 4))
    return {"first_loss": round(sum(losses[:n]) / n, 4), "last_loss": round(sum(losses[-n:]) / n, 4)}


DECODER_SOURCES = ("sst2", "banking77", "fomc")


def build_decoder(folder: Path, data_dir: Path | None, steps: int, progress: Progress) -> dict:
    """A 4-layer Llama (hidden 256, 4 heads, SwiGLU 688, RMSNorm, RoPE, tied embeddings) and its
    4,096-token BPE, trained on next-token prediction over the corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.workers.tasks.causal_lm import IGNORE, encode_texts

    _seed()
    texts, sizes = _decoder_corpus(data_dir)
    tokenizer = _train_tokenizer(texts, vocab_size=4096)
    encoded = encode_texts(tokenizer, [t + tokenizer.eos_token for t in texts], max_length=64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)

    def batches():
        n = len(encoded["input_ids"])
        while True:
            for rows in torch.randperm(n, generator=generator).split(32):
                if len(rows) < 32:
                    continue
                batch = {k: v[rows] for k, v in encoded.items()}
                width = int(batch["attention_mask"].sum(-1).max())
                yield {k: v[:, :width] for k, v in batch.items()}

    def loss_of(model, batch):
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    losses = _fit(model, batches(), loss_of, steps, lr=2e-3, progress=progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"corpus": sizes, "tokens": int(encoded["attention_mask"].sum()), "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()), **_loss_ends(losses)}


def build_vit(folder: Path, data_dir: Path | None, steps: int, progress: Progress) -> dict:
    """A 6-layer ViT (28x28 grey, 4x4 patches, hidden 192, 3 heads) trained to classify MNIST's
    training carve-out; its accuracy on the validation carve-out goes into the stamp."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from peftlab.workers.image_data import load_image_classification

    _seed()
    data = load_image_classification("mnist", data_dir=data_dir)
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=192, num_hidden_layers=6,
                       num_attention_heads=3, intermediate_size=768, num_labels=data.num_labels,
                       id2label=dict(enumerate(data.label_names)),
                       label2id={name: i for i, name in enumerate(data.label_names)})
    model = ViTForImageClassification(config)

    def scaled(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - 0.5) / 0.5

    generator = torch.Generator().manual_seed(0)

    def batches():
        n = len(data.train_labels)
        while True:
            for rows in torch.randperm(n, generator=generator).split(64):
                yield scaled(data.train_images[rows]), data.train_labels[rows]

    def loss_of(model, batch):
        return model(pixel_values=batch[0], labels=batch[1]).loss

    losses = _fit(model, batches(), loss_of, steps, lr=1e-3, progress=progress)
    model.eval()
    with torch.no_grad():
        images, labels = data.split("validation")
        predicted = torch.cat([model(pixel_values=scaled(chunk)).logits.argmax(-1) for chunk in images.split(256)])
    model.save_pretrained(folder)
    ViTImageProcessor(do_resize=True, size={"height": 28, "width": 28}, do_rescale=True, do_normalize=True,
                      image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    return {"corpus": {"mnist": len(data.train_labels)}, "parameters": sum(p.numel() for p in model.parameters()),
            **_loss_ends(losses),
            "validation_accuracy": round(float((predicted == labels).float().mean()), 4)}


BACKBONES = {
    b.name: b for b in (
        Backbone("peftlab-llama", "Llama-style decoder, 4 layers, 4.2M parameters; next token on the SST-2, "
                 "Banking77 and FOMC training sentences", steps=2000, recipe=1, build=build_decoder),
        Backbone("peftlab-vit", "ViT, 6 layers, 2.7M parameters, 28x28 grey; classifies MNIST's training digits",
                 steps=1000, recipe=1, build=build_vit),
    )
}


def folder(name: str) -> Path:
    return settings.backbones_dir() / name


def stamp(name: str) -> dict | None:
    """The built backbone's stamp, or None when it is not built (or an earlier recipe built it)."""
    path = folder(name) / STAMP
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found if found.get("recipe") == BACKBONES[name].recipe else None


def resolve(name: str) -> str:
    """The folder of a built backbone; one line saying how to build it otherwise."""
    backbone = BACKBONES[name]
    if stamp(name) is None:
        raise UserError(f"model '{name}' is built on this machine before use: run `peftlab pretrain {name}` "
                        f"({backbone.steps:,} optimizer steps on the CPU; it reads {settings.ENV_DATA})")
    return str(folder(name))


def build(name: str, *, steps: int | None = None, data_dir: Path | None = None,
          progress: Progress = lambda step, steps, loss: None) -> dict:
    """Pretrain backbone `name` into its folder (replacing a previous build whole) and return its stamp."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    backbone = BACKBONES[name]
    steps = backbone.steps if steps is None else steps
    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps must be 1..{MAX_STEPS}, got {steps}")
    target = folder(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A killed build leaves only this hidden folder, which the next build of the name clears first.
    staging = target.parent / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    started = time.monotonic()
    try:
        figures = backbone.build(staging, data_dir or settings.data_dir(), steps, progress)
        record = {"name": name, "recipe": backbone.recipe, "steps": steps,
                  "seconds": round(time.monotonic() - started, 1), **figures}
        (staging / STAMP).write_text(json.dumps(record, indent=2) + "\n")
        # A half-written folder is never visible under the backbone's name: the old one goes, the new one moves in.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
