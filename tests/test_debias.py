"""PEFTDebias: its counterfactual corpus, its first stage under the pre-training objective, and the
first stage frozen while the task LoRA trains; refusals for a model without that objective and for
an empty corpus."""
from __future__ import annotations

import itertools

import torch

from peftlab.workers.counterfactual import augment, counterfactual
from peftlab.workers.methods import Calibration, get_method
from peftlab.workers.methods.peft_debias import mask_tokens
from peftlab.workers.tasks import Task
from peftlab.workers.train import LoopSettings, train
from tiny_models import ALL_CONFIGS, TINY_TEXTS, batch, build, build_meta, task_for, tiny_tokenizer


def test_counterfactual_swaps_gender_and_race_words_keeping_case():
    assert counterfactual("He told his Sister.", ["gender"]) == "She told her Brother."
    assert counterfactual("Her father is here", ["gender"]) == "His mother is here"
    assert counterfactual("BLACK and white", ["race"]) == "WHITE and asian"
    assert counterfactual("a good movie", ["gender", "race"]) is None
    assert counterfactual("the chef", ["gender"]) is None  # words inside others are not touched ("he")
    assert augment(["he is here", "no one", "she left"], ["gender"]) == ["he is here", "she is here",
                                                                        "she left", "he left"]


def test_mask_tokens_masks_only_real_tokens_and_always_one():
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(TINY_TEXTS, padding=True, return_special_tokens_mask=True, return_tensors="pt")
    special = encoded["special_tokens_mask"] | (encoded["attention_mask"] == 0)
    inputs, labels = mask_tokens(tokenizer, encoded["input_ids"], special, torch.Generator().manual_seed(0))
    masked = labels != -100
    assert masked.any() and not (masked & special.bool()).any()
    assert torch.equal(labels[masked], encoded["input_ids"][masked])
    assert (inputs[masked] == tokenizer.mask_token_id).float().mean() > 0.5  # 80% become [MASK]
    one = tokenizer(["a movie"], return_special_tokens_mask=True, return_tensors="pt")
    _, labels = mask_tokens(tokenizer, one["input_ids"], one["special_tokens_mask"], torch.Generator().manual_seed(1))
    assert (labels != -100).sum() >= 1


class TinyTask(Task):
    """The tiny model's random batches; evaluation is not what these tests look at."""

    def __init__(self, config) -> None:
        self.config = config

    def train_batches(self, batch_size: int, seed: int):
        return (batch(self.config, seed=seed + i) for i in itertools.count())

    def evaluate(self, model, batch_size, device, split="validation") -> dict[str, float]:
        return {"loss": 0.0}


def _debiased(shape: str, steps: int = 20):
    config = ALL_CONFIGS[shape]()
    method = get_method("peft_debias")
    model = method.apply(build(config), {"r": 2, "debias_r": 2, "debias_steps": steps, "debias_batch_size": 4,
                                         "debias_lr": 1e-2, "dropout": 0.0}, task_for(config))
    calibration = Calibration(batches=(batch(config, seed=i) for i in itertools.count()), texts=list(TINY_TEXTS),
                              processor=tiny_tokenizer(), model_name=config, max_length=16)
    return config, method, model, method.calibrate(model, calibration)


def test_stage_one_learns_the_corpus_and_stays_frozen_in_stage_two():
    for shape in ("bert", "llama"):  # masked LM and next token
        config, method, model, figures = _debiased(shape, steps=30)
        assert figures["calibration/corpus_texts"] == 10  # five texts hold a swap word, each with its twin
        assert figures["calibration/stage1_loss_last"] < figures["calibration/stage1_loss_first"], figures
        stage_one = {n: p.detach().clone() for n, p in model.named_parameters() if ".debias_" in n}
        assert stage_one and all(not p.requires_grad for n, p in model.named_parameters() if ".debias_" in n)
        assert any(t.abs().sum() > 0 for n, t in stage_one.items() if n.endswith("debias_B"))  # it trained
        task = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert task and all(".task_" in n or "classifier" in n or "score" in n for n in task)
        train(model, TinyTask(config), LoopSettings(max_steps=5, batch_size=3, eval_batch_size=3, eval_every=5,
                                          warmup_ratio=0.0, max_grad_norm=1.0, lr=1e-2, weight_decay=0.0),
              seed=0, device=torch.device("cpu"))
        for name, before in stage_one.items():
            assert torch.equal(dict(model.named_parameters())[name], before), name
        assert any(not torch.equal(dict(model.named_parameters())[n], t) for n, t in task.items())


def test_saved_adapter_holds_both_stages(tmp_path):
    config, method, model, _ = _debiased("bert", steps=5)
    method.save(model, tmp_path)
    loaded = method.load(build(config), tmp_path)
    inputs = {k: v for k, v in batch(config).items() if k != "labels"}
    model.eval()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_refusals_before_anything_runs():
    method = get_method("peft_debias")
    vit = ALL_CONFIGS["vit"]()
    (problem,) = method.check_applicable(build_meta(vit), {}, task_for(vit))
    assert "pre-training objective" in problem and "has neither" in problem
    bert = ALL_CONFIGS["bert"]()
    (problem,) = method.check_applicable(build_meta(bert), {"axes": ["age"]}, task_for(bert))
    assert "axes: ['age'] unknown" in problem
    (problem,) = method.data_problems(method.resolve({}), ["a good movie", "a bad movie"])
    assert "none of the task's 2 training texts holds a gender word" in problem
    assert method.data_problems(method.resolve({"axes": ["gender", "race"]}), TINY_TEXTS) == []
