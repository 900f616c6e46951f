"""The language-modelling head of a (possibly adapted) task model's backbone, and sentence
(pseudo-)log-likelihoods under it: what bias scores and debiasing stages read."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.workers.models import VISION_ALIASES, load_config, resolve_model

OBJECTIVES = {"mlm": "masked-LM", "clm": "causal-LM"}
_HEAD_ARCHITECTURES = ("ForMaskedLM", "ForCausalLM", "LMHeadModel", "ForPreTraining")


# -- which head a model has ----------------------------------------------------------------------
def _lm_class_names(model_type: str) -> tuple[str | None, str | None]:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def objective_for_config(config) -> str | None:
    """The objective ("mlm" or "clm") of the LM class transformers maps the config to; None: neither.

    Encoders with both (BERT has BertLMHeadModel too) are masked LMs unless the config says decoder.
    """
    mlm, clm = _lm_class_names(config.model_type)
    architectures = getattr(config, "architectures", None) or []
    if clm and (getattr(config, "is_decoder", False)
                or any(a == clm or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        return "clm"
    return "mlm" if mlm else ("clm" if clm else None)


def _lm_class(config, objective: str) -> type[nn.Module]:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    return auto._model_mapping[type(config)]


def _head_groups(config, objective: str) -> list[list[str]]:
    """The LM head's own tensors (those not tied to the backbone), each as the names it goes by."""
    with torch.device("meta"):
        lm = _lm_class(config, objective)(config)
    prefix = lm.base_model_prefix + "."
    backbone = {id(p) for n, p in lm.named_parameters(remove_duplicate=False) if n.startswith(prefix)}
    groups: dict[int, list[str]] = {}
    for name, tensor in [*lm.named_parameters(remove_duplicate=False), *lm.named_buffers(remove_duplicate=False)]:
        if not name.startswith(prefix) and id(tensor) not in backbone:
            groups.setdefault(id(tensor), []).append(name)
    persistent = set(lm.state_dict())
    return [names for names in groups.values() if any(n in persistent for n in names)]


def _aliases(name: str) -> tuple[str, ...]:
    # Old checkpoints (bert-base-uncased among them) name LayerNorm tensors gamma and beta.
    stem, _, leaf = name.rpartition(".")
    legacy = {"weight": "gamma", "bias": "beta"}.get(leaf)
    return (name, f"{stem}.{legacy}") if legacy else (name,)


def _find(group: list[str], keys: Any) -> str | None:
    return next((alias for name in group for alias in _aliases(name) if alias in keys), None)


def _local_file(source: str, filename: str) -> Path | None:
    folder = Path(source)
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, filename)
    return Path(found) if isinstance(found, str) else None


def _checkpoint_index(source: str, *, download: bool = False) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of the checkpoint (a local folder or the Hub cache; with
    `download`, the Hub); None when no safetensors checkpoint is found. Reads key names only."""
    from safetensors import safe_open

    def locate(filename: str) -> Path | None:
        path = _local_file(source, filename)
        if path is None and download and not Path(source).is_dir():
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(source, filename))
            except EntryNotFoundError:
                return None
        return path

    if (single := locate("model.safetensors")) is not None:
        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    if (index := locate("model.safetensors.index.json")) is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: index.parent / shard for key, shard in weight_map.items()}
    return None


def _summarise(names: list[str]) -> str:
    return ", ".join(sorted({".".join(n.split(".")[:2]) + ("" if n.count(".") < 2 else ".*") for n in names}))


def lm_objective(model_name: str) -> tuple[str | None, str]:
    """("mlm" | "clm", "") for a model with a trained language-modelling head, else (None, why).

    The checkpoint's tensor names (never its weights) decide whether the head was trained; a Hub
    id not on disk is trusted when its config.architectures names an LM class.
    """
    if model_name in VISION_ALIASES:
        return None, f"model '{model_name}' is a CIFAR ResNet image classifier: it has no language-modelling head"
    config = load_config(model_name, None)
    objective = objective_for_config(config)
    if objective is None:
        return None, (f"model '{model_name}' ({config.model_type}) has no masked- or causal-LM class in "
                      "transformers, so no language-modelling head")
    source = resolve_model(model_name)
    index = _checkpoint_index(source)
    architectures = list(getattr(config, "architectures", None) or [])
    if index is None:
        if any(a.endswith(_HEAD_ARCHITECTURES) for a in architectures):
            return objective, ""
        return None, (f"model '{model_name}' names no LM head class in config.architectures "
                      f"({', '.join(architectures) or 'none'}) and no safetensors checkpoint is on disk to check")
    missing = [g[0] for g in _head_groups(config, objective) if _find(g, index) is None]
    if missing:
        return None, (f"model '{model_name}' ({', '.join(architectures) or config.model_type}) has no trained "
                      f"{OBJECTIVES[objective]} head: its checkpoint lacks {_summarise(missing)}")
    return objective, ""


# -- an LM over the task model's backbone -------------------------------------------------------
def _unwrap(task_model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return task_model.get_base_model() if isinstance(task_model, PeftModel) else task_model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model (peft-wrapped or not) already is a transformers causal LM."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        return False
    _, clm = _lm_class_names(config.model_type)
    return type(inner).__name__ == clm or type(inner).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def task_objective(task_model: nn.Module, model_name_or_config) -> str:
    """The objective bias scores use for this task model; UserError (one line) when it has no LM head."""
    if is_causal_lm(task_model):
        return "clm"
    if isinstance(model_name_or_config, str):
        objective, reason = lm_objective(model_name_or_config)
        if objective is None:
            raise UserError(reason)
        return objective
    objective = objective_for_config(model_name_or_config)
    if objective is None:
        raise UserError(f"model type '{model_name_or_config.model_type}' has no masked- or causal-LM class in "
                        "transformers, so no language-modelling head")
    return objective


def _load_head(lm: nn.Module, groups: list[list[str]], source: str) -> None:
    """Materialises the LM head's tensors (on the meta device until now) from the checkpoint."""
    index = _checkpoint_index(source, download=True)
    if index is None:
        raise UserError(f"model at '{source}' has no safetensors checkpoint to read its LM head from")
    from safetensors import safe_open

    tensors = dict(lm.named_parameters(remove_duplicate=False)) | dict(lm.named_buffers(remove_duplicate=False))
    for group in groups:
        key = _find(group, index)
        if key is None:
            raise UserError(f"model at '{source}' has no trained LM head: its checkpoint lacks {_summarise(group)}")
        with safe_open(str(index[key]), "pt", device="cpu") as f:
            value = f.get_tensor(key)
        target = tensors[group[0]]
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))


class PromptedLM(nn.Module):
    """An LM fed a prompt-tuned peft model's soft tokens before its inputs, as peft's forward feeds
    them to the task model; the logits of the soft tokens are dropped."""

    def __init__(self, lm: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self._peft = [peft_model]  # a list: not a submodule, so its parameters are not counted twice

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        peft_model = self._peft[0]
        embeds = self.lm.get_input_embeddings()(input_ids)
        prompts = peft_model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
        count = prompts.shape[1]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], count), attention_mask], 1)
        if (types := kwargs.get("token_type_ids")) is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], count), types], 1)
        out = self.lm(inputs_embeds=torch.cat([prompts, embeds], 1), attention_mask=attention_mask, **kwargs)
        out.logits = out.logits[:, count:]
        return out


def with_lm_head(task_model: nn.Module, model_name_or_config, *, seed: int = 0) -> nn.Module:
    """A transformers masked or causal LM whose backbone IS the task model's backbone (the same
    module, adapters included), with the head's weights from the pretrained checkpoint, or, given a
    config, initialised from it with `seed`. A causal LM task model is returned as it is."""
    from peft import PeftModel

    if is_causal_lm(task_model):
        return task_model
    objective = task_objective(task_model, model_name_or_config)
    inner = _unwrap(task_model)
    config = inner.config
    prefix = inner.base_model_prefix
    backbone = getattr(inner, prefix, None)
    if backbone is None:
        raise UserError(f"{type(inner).__name__} keeps no backbone under '{prefix}' to put an LM head on")
    embeddings = backbone.get_input_embeddings()
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    from_checkpoint = isinstance(model_name_or_config, str)
    if not from_checkpoint:
        config = model_name_or_config
    # Built on the meta device, so only the head ever gets memory: the backbone is the task model's.
    with torch.device("meta"):
        lm = _lm_class(config, objective)(config)
    setattr(lm, prefix, backbone)
    head = [child for name, child in lm.named_children() if name != prefix]
    for child in head:
        child.to_empty(device=device).to(dtype)
    if from_checkpoint:
        _load_head(lm, _head_groups(config, objective), resolve_model(model_name_or_config))
    else:
        # Its own random state, so the caller's (a trial's dropout and data order) is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Before tying: a tied output layer would otherwise re-initialise the backbone's embeddings.
            for module in (m for child in head for m in child.modules()):
                lm._init_weights(module)
    lm.tie_weights()
    output = lm.get_output_embeddings()
    if getattr(lm.config, "tie_word_embeddings", False) and output.weight is not backbone.get_input_embeddings().weight:
        output.weight = backbone.get_input_embeddings().weight  # an adapter wrapping the embeddings hides its path
    lm.eval()
    if isinstance(task_model, PeftModel) and task_model.active_peft_config.is_prompt_learning:
        if task_model.active_peft_config.peft_type.value != "PROMPT_TUNING":
            raise UserError(f"{task_model.active_peft_config.peft_type.value}: an LM head can follow soft "
                            "prompts only (prompt tuning), not prefixes in the attention cache")
        return PromptedLM(lm, task_model)
    return lm


# -- sentence log-likelihoods --------------------------------------------------------------------
def encode(tokenizer, sentence: str, objective: str) -> list[int]:
    """Token ids as they are scored: BOS (where the tokenizer has one) + tokens for a causal LM,
    the tokenizer's own special tokens around them for a masked LM."""
    if objective == "clm":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer(sentence, add_special_tokens=False)["input_ids"]
    return tokenizer(sentence)["input_ids"]


def scored_positions(tokenizer, sentence: str, objective: str) -> list[int]:
    """Positions of `encode`'s ids that count: every token after the first for a causal LM (the
    first, BOS or not, has no context), every token the tokenizer did not add for a masked LM."""
    if objective == "clm":
        return list(range(1, len(encode(tokenizer, sentence, objective))))
    special = tokenizer(sentence, return_special_tokens_mask=True)["special_tokens_mask"]
    return [i for i, flag in enumerate(special) if not flag]


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _logits(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A prompt-tuned peft causal LM returns logits for its soft tokens too: they come first.
    return lm(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:].float()


@torch.no_grad()
def token_log_likelihoods(lm: nn.Module, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                          objective: str, *, device: torch.device | str, mask_token_id: int | None = None,
                          pad_token_id: int = 0, batch_size: int = 32) -> list[float]:
    """Per sequence, the summed log-probability of its tokens at `positions`: log p(token | earlier
    tokens) for "clm"; for "mlm" the pseudo-log-likelihood, each position masked in its own copy."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    totals = [0.0] * len(sequences)
    was_training = lm.training
    lm.eval()
    if objective == "clm":
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _padded([sequences[i] for i in rows], pad_token_id, device)
            logits = _logits(lm, ids, mask)
            # Row t of logits predicts token t + 1.
            token = logits[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2) - logits[:, :-1].logsumexp(-1)
            for row, i in enumerate(rows):
                wanted = torch.tensor(positions[i], dtype=torch.long, device=token.device) - 1
                totals[i] = float(token[row, wanted].sum())
    else:
        if mask_token_id is None:
            raise ValueError("a masked LM's pseudo-log-likelihood needs the tokenizer's mask token")
        items = sorted(((i, p) for i, ps in enumerate(positions) for p in ps), key=lambda it: len(sequences[it[0]]))
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids, mask = _padded([sequences[i] for i, _ in chunk], pad_token_id, device)
            rows = torch.arange(len(chunk), device=ids.device)
            where = torch.tensor([p for _, p in chunk], device=ids.device)
            truth = ids[rows, where].clone()
            ids[rows, where] = mask_token_id
            logits = _logits(lm, ids, mask)[rows, where]
            scores = (logits.gather(1, truth[:, None]).squeeze(1) - logits.logsumexp(-1)).tolist()
            for (i, _), score in zip(chunk, scores, strict=True):
                totals[i] += score
    lm.train(was_training)
    return totals


def sentence_log_likelihoods(lm: nn.Module, tokenizer, sentences: Sequence[str], objective: str, *,
                             device: torch.device | str, batch_size: int = 32,
                             positions: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Each sentence's log-likelihood ("clm") or pseudo-log-likelihood ("mlm", Salazar et al. 2020);
    `positions` (indices into `encode`'s ids) restricts the tokens that count."""
    sequences = [encode(tokenizer, s, objective) for s in sentences]
    if positions is None:
        positions = [scored_positions(tokenizer, s, objective) for s in sentences]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mask = tokenizer.mask_token_id if objective == "mlm" else None
    return token_log_likelihoods(lm, sequences, positions, objective, device=device, mask_token_id=mask,
                                 pad_token_id=pad, batch_size=batch_size)
