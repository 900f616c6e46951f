"""Light-PEFT: the estimation stage, pruning for real (heads, neurons, LoRA modules and ranks), the pruned
model's equality to the binary-masked one, its save/load and merge, and a run through the training loop
that prunes at its step and trains on (tiny random models, CPU)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, DistilBertConfig

from peftlab.errors import UserError
from peftlab.workers.architectures import architecture
from peftlab.workers.architectures import blocks as transformer_blocks
from peftlab.workers.methods import TaskInfo, get_method
from peftlab.workers.methods.base import ADAPTER_WEIGHTS
from peftlab.workers.methods.light_peft import LightLoraLinear, binary_masks, mask_values
from peftlab.workers.methods.wrapped import linear_dims
from tiny_models import ALL_CONFIGS, batch, build, build_meta, task_for

METHOD = get_method("light_peft")


def tiny_distilbert_config() -> DistilBertConfig:
    return DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=37, num_labels=3)


def shape(name: str):
    """(config, task, inputs of a seeded batch) for a tiny model of this shape."""
    if name == "distilbert":
        config = tiny_distilbert_config()

        def inputs(seed: int = 0) -> dict:
            found = batch(config, seed=seed)
            found.pop("token_type_ids")
            return found

        return config, TaskInfo("text-classification", 3, ("pre_classifier", "classifier")), inputs
    config = ALL_CONFIGS[name]()
    return config, task_for(config), lambda seed=0: batch(config, seed=seed)


def fresh(config) -> nn.Module:
    if config.model_type == "distilbert":
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config).eval()
    return build(config)


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def train(model: nn.Module, inputs, steps: int, *, first: int = 1, max_steps: int = 100, lr: float = 1e-2) -> None:
    """Optimizer steps as the loop takes them: the method's on_step after each, before gradients go."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(first, first + steps):
        model(**inputs(seed=step)).loss.backward()
        optimizer.step()
        METHOD.on_step(model, step, max_steps)
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def parameters(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def weight_of(module: nn.Module) -> torch.Tensor:
    return module.base.weight if isinstance(module, LightLoraLinear) else module.weight


def dims(module: nn.Module) -> tuple[int, int]:
    return linear_dims(module.base if isinstance(module, LightLoraLinear) else module)


def nearest(x: float) -> int:
    return math.floor(x + 0.5)


# -- pruning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "distilbert"])
def test_pruning_cuts_the_stated_share_and_equals_the_binary_masked_model(name):
    config, task, inputs = shape(name)
    hp = {"r": 4, "target_modules": "all-linear", "estimation_steps": 3, "module_ratio": 0.25}
    model = METHOD.apply(fresh(config), hp, task)
    train(model, inputs, 3)
    units = architecture(model).units
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    blocks = [n for n, _ in transformer_blocks(model, skip=task.head_modules)]
    assert len(blocks) == config.num_hidden_layers
    neurons = dims(model.get_submodule(f"{blocks[0]}.{units.ffn_down}"))[0]
    query_width = dims(model.get_submodule(f"{blocks[0]}.{units.query}"))[1] // (3 if units.key is None else 1)
    head_dim = query_width // heads
    masked = copy.deepcopy(model)
    trainable_before, total_before = parameters(model)
    layers_before = {n: m.rank for n, m in model.named_modules() if isinstance(m, LightLoraLinear)}

    removed = METHOD.prune(model)
    structure = METHOD.structure(model)

    # The stated share of all heads (whole key/value groups under GQA) and neurons, lowest |mask| first.
    all_groups, all_neurons = groups * len(blocks), neurons * len(blocks)
    kept_groups = {b: len(structure["heads"][b]) for b in blocks}
    kept_neurons = {b: len(structure["neurons"][b]) for b in blocks}
    assert all_groups - sum(kept_groups.values()) == min(nearest(all_groups / 3), all_groups - len(blocks))
    assert all_neurons - sum(kept_neurons.values()) == nearest(all_neurons / 3)
    assert min(kept_groups.values()) >= 1 and min(kept_neurons.values()) >= 1
    assert removed["pruning/heads"] == pytest.approx(1 - sum(kept_groups.values()) / all_groups)
    assert removed["pruning/neurons"] == pytest.approx(1 - sum(kept_neurons.values()) / all_neurons)
    # ... counted in the weights' shapes and the attention's own head counts.
    g = heads // groups
    for b in blocks:
        block, h, n = model.get_submodule(b), kept_groups[b] * g, kept_neurons[b]
        if units.key is None:
            assert dims(block.get_submodule(units.query))[1] == 3 * h * head_dim
        else:
            assert dims(block.get_submodule(units.query))[1] == h * head_dim
            for path in (units.key, units.value):
                assert dims(block.get_submodule(path))[1] == kept_groups[b] * head_dim
        assert dims(block.get_submodule(units.attention_out))[0] == h * head_dim
        for attribute in units.head_counts:
            owner, _, attr = attribute.rpartition(".")
            assert getattr(block.get_submodule(owner), attr) == h
        for path in units.ffn_up:
            assert dims(block.get_submodule(path))[1] == n
        assert dims(block.get_submodule(units.ffn_down))[0] == n
        for attribute in units.head_widths + units.ffn_widths:
            owner, _, attr = attribute.rpartition(".")
            assert getattr(block.get_submodule(owner), attr) in (h * head_dim, n)
    # Really smaller: fewer frozen weights (each one a multiply-add per token), fewer trainable ones.
    trainable_after, total_after = parameters(model)
    assert total_after < total_before and trainable_after < trainable_before
    assert removed["pruning/model_params"] == pytest.approx(1 - total_after / total_before)
    assert not any(n.endswith("light_peft_mask") for n, _ in model.named_parameters())
    assert not any(n.endswith("_importance") for n, _ in model.named_buffers())
    # LoRA: a quarter of the modules dropped back to plain layers, half the ranks of the others cut.
    dropped = [n for n, r in structure["lora"].items() if r is None]
    assert len(dropped) == nearest(len(layers_before) / 4)
    assert all(not isinstance(model.get_submodule(n), LightLoraLinear) for n in dropped)
    kept = {n: model.get_submodule(n) for n, r in structure["lora"].items() if r is not None}
    assert sum(m.rank for m in kept.values()) == 4 * len(kept) - nearest(4 * len(kept) / 2)
    assert removed["pruning/lora_modules"] == pytest.approx(len(dropped) / len(layers_before))
    assert removed["pruning/lora_ranks"] == pytest.approx(0.5)

    # Before further training the pruned model is the unpruned one with binary masks.
    binary_masks(masked, structure)
    torch.testing.assert_close(logits(model, inputs()), logits(masked, inputs()), atol=1e-5, rtol=0)
    # And it trains on.
    train(model, inputs, 2, first=4)
    assert torch.isfinite(logits(model, inputs())).all()


def test_binary_masks_make_a_head_and_a_neuron_vanish():
    """The masks scale what the removed units send on: a zero mask is the unit cut out."""
    config, task, inputs = shape("bert")
    model = METHOD.apply(fresh(config), {"r": 2}, task)
    block = model.bert.encoder.layer[0]
    seen = {}
    block.attention.output.dense.register_forward_hook(lambda m, args, out: seen.__setitem__("o", args[0]))
    block.output.dense.register_forward_hook(lambda m, args, out: seen.__setitem__("down", args[0]))
    structure = {"heads": {"bert.encoder.layer.0": [0, 2, 3], "bert.encoder.layer.1": [0, 1, 2, 3]},
                 "neurons": {"bert.encoder.layer.0": [i for i in range(37) if i != 5],
                             "bert.encoder.layer.1": list(range(37))},
                 "lora": {n: [0, 1] for n, m in model.named_modules() if isinstance(m, LightLoraLinear)}}
    binary_masks(model, structure)
    logits(model, inputs())
    head_dim = config.hidden_size // config.num_attention_heads
    assert seen["o"][..., head_dim:2 * head_dim].abs().max() < 1e-6 and seen["o"][..., :head_dim].abs().max() > 0
    assert seen["down"][..., 5].abs().max() < 1e-6 and seen["down"][..., 4].abs().max() > 0


def test_masks_learn_at_their_factor_of_the_learning_rate():
    """A mask's parameter takes the mask's own gradient, so a step moves the mask lr_scale times as far as
    the same step on the mask itself (SGD here; Adam's steps are scale-free anyway)."""
    config, task, inputs = shape("bert")
    grads, moves = {}, {}
    for scale in (1.0, 100.0):
        model = METHOD.apply(fresh(config), {"r": 2, "head_mask_lr_scale": scale}, task).eval()
        o = model.bert.encoder.layer[0].attention.output.dense
        model(**inputs()).loss.backward()
        grads[scale] = o.light_peft_mask.grad.clone()
        before = mask_values(o).detach().clone()
        torch.optim.SGD([o.light_peft_mask], lr=10.0).step()
        moves[scale] = (mask_values(o).detach() - before).double()
    assert grads[1.0].abs().min() > 1e-6
    torch.testing.assert_close(grads[100.0], grads[1.0])
    torch.testing.assert_close(moves[1.0], -10.0 * grads[1.0].double(), rtol=1e-2, atol=0)
    torch.testing.assert_close(moves[100.0], 100 * moves[1.0], rtol=1e-2, atol=0)


def test_importance_picks_the_lowest_heads_neurons_modules_and_ranks():
    config, task, inputs = shape("bert")
    hp = {"r": 4, "estimation_steps": 1, "head_ratio": 0.25, "neuron_ratio": 3 / 74, "module_ratio": 0.5,
          "rank_ratio": 0.5, "dropout": 0.0}
    model = METHOD.apply(fresh(config), hp, task)
    layers = [n for n, m in model.named_modules() if isinstance(m, LightLoraLinear)]
    assert len(layers) == 4  # query and value of two blocks
    with torch.no_grad():
        # Only modules 0 and 3 have an update, and only in ranks 0 and 2: the others move nothing, and
        # ranks with a zero column of B have zero first-order importance.
        for i in (0, 3):
            model.get_submodule(layers[i]).lora_B[:, [0, 2]] = torch.randn(config.hidden_size, 2)
        # Head masks 1, 0.1, 1, 1 and 1, 1, -0.05, 1; three neurons with small masks.
        for b, (head, value) in enumerate(((1, 0.1), (2, -0.05))):
            o = model.bert.encoder.layer[b].attention.output.dense
            o.light_peft_mask[head] = (value - 1) / o.light_peft_lr_scale
        down0, down1 = model.bert.encoder.layer[0].output.dense, model.bert.encoder.layer[1].output.dense
        for down, neuron, value in ((down0, 7, 0.2), (down1, 30, -0.1), (down1, 3, 0.3)):
            down.light_peft_mask[neuron] = (value - 1) / down.light_peft_lr_scale
    assert mask_values(down1)[30].item() == pytest.approx(-0.1)
    model.train()
    model(**inputs()).loss.backward()
    METHOD.on_step(model, 1, 10)  # the stage is step 1: its second half too
    METHOD.prune(model)
    structure = METHOD.structure(model)
    assert structure["heads"] == {"bert.encoder.layer.0": [0, 2, 3], "bert.encoder.layer.1": [0, 1, 3]}
    assert 7 not in structure["neurons"]["bert.encoder.layer.0"]
    assert {3, 30}.isdisjoint(structure["neurons"]["bert.encoder.layer.1"])
    assert sum(map(len, structure["neurons"].values())) == 74 - 3
    assert structure["lora"] == {layers[0]: [0, 2], layers[1]: None, layers[2]: None, layers[3]: [0, 2]}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_a_pruned_trained_adapter_reloads_into_a_fresh_base_and_merges(name, tmp_path):
    config, task, inputs = shape(name)
    hp = {"r": 4, "estimation_steps": 2, "module_ratio": 0.5}
    model = METHOD.apply(fresh(config), hp, task)
    train(model, inputs, 2)
    METHOD.prune(model)
    train(model, inputs, 3, first=3)
    expected = logits(model, inputs())
    METHOD.save(model, tmp_path)
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert saved.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("light_peft_mask" in n for n in saved)  # no frozen or mask tensors: only LoRA and head
    loaded = METHOD.load(fresh(config), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs()), expected, atol=1e-6, rtol=0)
    assert parameters(loaded)[1] == parameters(model)[1]
    merged = METHOD.merge(model)
    assert not any(isinstance(m, LightLoraLinear) for m in merged.modules())
    assert not merged._forward_hooks and not merged._forward_pre_hooks
    torch.testing.assert_close(logits(merged, inputs()), expected, rtol=1e-4, atol=1e-6)


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", ["head_ratio", "neuron_ratio", "module_ratio", "rank_ratio"])
@pytest.mark.parametrize("value", [1.0, -0.1, 2])
def test_a_ratio_outside_zero_to_one_is_refused_in_one_line(ratio, value):
    with pytest.raises(UserError) as err:
        METHOD.resolve({ratio: value})
    assert f"{ratio}: {value!r} " in str(err.value) and "\n" not in str(err.value)
    config = ALL_CONFIGS["bert"]()
    (problem,) = METHOD.check_applicable(build_meta(config), {ratio: value}, task_for(config))
    bound = "below the allowed range (>= 0.0)" if value < 0 else "above the allowed range (< 1.0)"
    assert problem.endswith(f"{ratio}: {value!r} is {bound}")
    assert METHOD.resolve({ratio: 0.0})[ratio] == 0.0 and METHOD.resolve({ratio: 0.99})[ratio] == 0.99


def test_a_spec_with_a_ratio_of_one_fails_validation(tiny_bert_dir, sentiment_csv):
    from peftlab.spec import SpecError, parse_spec

    with pytest.raises((SpecError, UserError)) as err:
        parse_spec({"name": "x", "model": str(tiny_bert_dir), "tasks": [{"dataset": str(sentiment_csv)}],
                    "methods": {"light_peft": {"head_ratio": 1.0}}})
    assert "head_ratio: 1.0 is above the allowed range (< 1.0)" in str(err.value)


def test_models_without_heads_to_prune_are_refused_in_one_line():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)

    (problem,) = METHOD.check_applicable(Unknown(), {"target_modules": ["proj"]}, TaskInfo("text-classification", 2,
                                                                                           ("classifier",)))
    assert problem.startswith("method light_peft prunes attention heads and FFN neurons") and "Unknown" in problem
    assert "llama" in problem and "\n" not in problem


# -- the training loop -----------------------------------------------------------------------------------
def test_the_loop_prunes_at_its_step_trains_on_and_resumes_either_side(tiny_bert_dir, sentiment_csv, tmp_path):
    from peftlab.spec import parse_spec
    from peftlab.workers import checkpoint
    from peftlab.workers.train import Stepper, TrialLoop
    from peftlab.workers.trial import TrialContext, prepare_trial

    hparams = {"r": 4, "lr": 5e-3, "estimation_steps": 6, "target_modules": "all-linear"}
    training = {"max_steps": 12, "batch_size": 16, "eval_every": 4, "log_every": 1, "seeds": [0], "checkpoint_every": 1}
    spec = parse_spec({"name": "lp", "model": str(tiny_bert_dir),
                       "tasks": [{"dataset": str(sentiment_csv), "max_eval_samples": 32, "retention": False}],
                       "methods": {"light_peft": hparams}, "training": training})
    context = TrialContext(experiment="lp", model=str(tiny_bert_dir), task=spec.tasks[0], training=spec.training,
                           adapters_dir="/nonexistent", data_dir=None, cpus=1, gpus=0)
    owner = {"experiment": "lp", "trial_id": "t"}

    def run(resume: Path | None = None):
        trial = prepare_trial({"method": "light_peft", "light_peft": hparams, "seed": 0}, context)
        model, records, saved, pruned = trial.model, [], {}, {}
        reshaping = trial.reshaping()
        prune = reshaping.prune

        def watch(step: int):
            before = [p for p in model.parameters() if p.requires_grad]
            removed = prune(step)
            if removed is not None:
                pruned.update(step=step, removed=removed, before=before)
            return removed

        def keep(record, write) -> None:
            folder = tmp_path / f"{id(trial)}-{record.step}"
            write(folder)
            checkpoint.claim(folder, owner)
            saved[record.step] = folder
            records.append(record)

        stepper = Stepper(model, trial.settings, trial.device,
                          after_step=lambda step: METHOD.on_step(model, step, trial.settings.max_steps))
        loop = TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed,
                         static=trial.static, report=records.append, save=None, adapter_dir=None, checkpoint=keep,
                         checkpoint_every=1, resume=resume,
                         reshaping=type(reshaping)(watch, reshaping.structure, reshaping.restructure))
        loop.train()
        return trial, stepper, records, saved, pruned

    trial, stepper, records, saved, pruned = run()
    assert pruned["step"] == 6
    assert {"pruning/heads", "pruning/neurons", "pruning/lora_modules", "pruning/lora_ranks"} <= set(pruned["removed"])
    assert all(math.isfinite(r.train_loss) for r in records if r.train_loss is not None)
    assert [r.step for r in records][-1] == 12
    # The optimizer was made anew over exactly what is trainable after pruning.
    now = [p for p in trial.model.parameters() if p.requires_grad]
    assert [id(p) for p in stepper.optimizer.param_groups[0]["params"]] == [id(p) for p in now]
    assert sum(p.numel() for p in now) < sum(p.numel() for p in pruned["before"])
    assert records[-1].costs.trainable_params == sum(p.numel() for p in now) < trial.static.trainable_params
    assert records[-1].figures["pruning/heads"] == pruned["removed"]["pruning/heads"]
    assert sorted(saved) == [4, 8]  # one checkpoint before pruning, one after

    # Resumed before the pruning (the importances are in the checkpoint) or after it (rebuilt from its
    # structure), a trial ends as the uninterrupted one.
    final = {n: p.detach().clone() for n, p in trial.model.named_parameters() if p.requires_grad}
    for step in (4, 8):
        torch.manual_seed(1234)
        again, _, later, _, _ = run(resume=saved[step])
        assert later[-1].metrics == pytest.approx(records[-1].metrics, abs=1e-6)
        assert METHOD.structure(again.model) == METHOD.structure(trial.model)
        state = {n: p.detach() for n, p in again.model.named_parameters() if p.requires_grad}
        assert state.keys() == final.keys() and all(torch.allclose(state[n], final[n], atol=1e-6) for n in final)
