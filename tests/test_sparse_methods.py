"""GPS and SPT as their papers define them: GPS keeps the top-K connections per row by accumulated
gradient, SPT splits its budget between sparse entries and LoRA by the threshold, and both store
indices and values whose optimizer state and adapter file grow with the selection, not the model."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from peftlab.errors import UserError
from peftlab.workers.methods import Calibration, get_method
from peftlab.workers.methods.sparse import GpsLinear, SptLinear, spt_split, supervised_contrastive
from tiny_models import CONFIGS, batch, build, task_for

BERT = CONFIGS["bert"]


def calibration(config, start: int = 100) -> Calibration:
    return Calibration(batches=(batch(config, seed=start + i) for i in itertools.count()))


def summed_gradients(config, batches: int, square: bool) -> dict[str, torch.Tensor]:
    """The gradient of every linear weight of the unadapted model over the calibration batches,
    summed (GPS) or summed squared (SPT), computed directly."""
    model = build(config)
    model.requires_grad_(True)
    sums = {n: torch.zeros_like(m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.startswith("classifier")}
    stream = calibration(config).batches
    for _ in range(batches):
        model.zero_grad()
        model(**next(stream)).loss.backward()
        for name, total in sums.items():
            grad = model.get_submodule(name).weight.grad
            total += grad.square() if square else grad
    return sums


def test_gps_keeps_the_top_k_connections_of_each_row_by_accumulated_gradient():
    config = BERT()
    method = get_method("gps")
    model = method.apply(build(config), {"k": 3, "loss": "ce", "calibration_batches": 4}, task_for(config))
    method.calibrate(model, calibration(config))
    expected = summed_gradients(config, 4, square=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GpsLinear)}
    assert set(layers) == set(expected)
    for name, layer in layers.items():
        d_out, d_in = layer.base.weight.shape
        chosen = layer.sparse_index.view(d_out, 3)
        assert torch.equal(chosen // d_in, torch.arange(d_out)[:, None].expand(d_out, 3))  # K per row
        top = expected[name].abs().topk(3, dim=1).indices
        assert torch.equal((chosen % d_in).sort(dim=1).values, top.sort(dim=1).values), name


def test_gps_supcon_pass_uses_the_representation_the_head_reads():
    config = BERT()
    features = torch.randn(6, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # By hand: anchor i's positive is its pair; log-softmax over the five others.
    z = torch.nn.functional.normalize(features, dim=1)
    sim = z @ z.T / 0.5
    total = 0.0
    for i in range(6):
        j = i ^ 1
        others = [k for k in range(6) if k != i]
        total += -(sim[i, j] - torch.logsumexp(sim[i, others], dim=0))
    torch.testing.assert_close(supervised_contrastive(features, labels, 0.5), total / 6)
    assert supervised_contrastive(features[:3], torch.tensor([0, 1, 2]), 0.5).item() == 0.0

    method = get_method("gps")
    a = method.apply(build(config), {"k": 2, "calibration_batches": 3}, task_for(config))
    b = method.apply(build(config), {"k": 2, "loss": "ce", "calibration_batches": 3}, task_for(config))
    assert method.calibrate(a, calibration(config)) == {"calibration/supcon": 1.0}
    assert method.calibrate(b, calibration(config)) == {"calibration/supcon": 0.0}
    index = lambda m: torch.cat([l.sparse_index for l in m.modules() if isinstance(l, GpsLinear)])  # noqa: E731
    assert not torch.equal(index(a), index(b))  # the two losses select differently


def test_spt_split_follows_the_threshold_by_hand():
    # Matrix 0 holds the three most sensitive weights and a threshold of 2: its third entry turns it
    # into a LoRA costing 10 (minus the 2 it held). Matrix 1 stays sparse.
    s0 = torch.tensor([9.0, 8.0, 7.0, 0.1])
    s1 = torch.tensor([6.0, 5.0, 0.2, 0.3])
    chosen, lora = spt_split([s0, s1], lora_costs=[10, 10], thresholds=[2, 2], budget=13)
    assert lora == [True, False]
    assert chosen[0].tolist() == [] and chosen[1].tolist() == [0, 1]  # 10 + 2 spent, then 1 short of s1's third
    # With less budget the switch does not fit: matrix 0 stays at its threshold, the walk goes on.
    chosen, lora = spt_split([s0, s1], lora_costs=[10, 10], thresholds=[2, 2], budget=4)
    assert lora == [False, False] and chosen[0].tolist() == [0, 1] and chosen[1].tolist() == [0, 1]


def test_spt_selects_the_most_sensitive_weights_and_gives_lora_where_they_crowd():
    config = BERT()
    method = get_method("spt")
    hp = {"params": 400, "r": 1, "lora_share": 0.2, "calibration_batches": 3}
    model = method.apply(build(config), hp, task_for(config))
    figures = method.calibrate(model, calibration(config))
    sums = summed_gradients(config, 3, square=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SptLinear)}
    names = list(layers)
    costs = [layers[n].base.in_features + layers[n].base.out_features for n in names]
    chosen, lora = spt_split([sums[n] for n in names], costs, [0.2 * c for c in costs], 400)
    assert any(lora) and not all(lora), "this budget must mix LoRA and sparse matrices"
    for name, entries, as_lora in zip(names, chosen, lora, strict=True):
        layer = layers[name]
        assert bool(layer.rank) == as_lora
        if not as_lora:
            assert torch.equal(layer.sparse_index, entries), name
            # Each sparse matrix keeps its own most sensitive entries, at most its threshold.
            top = sums[name].flatten().topk(len(entries)).indices.sort().values if len(entries) else entries
            assert torch.equal(entries, top) and len(entries) <= 0.2 * costs[names.index(name)]
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    assert trainable == sum(c for c, lo in zip(costs, lora, strict=True) if lo) + sum(len(c) for c in chosen)
    assert trainable <= 400
    assert figures["calibration/lora_matrices"] == sum(lora)


def test_sparse_state_and_adapter_grow_with_the_selection_not_the_model(tmp_path):
    config = BERT(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    method = get_method("gps")
    sizes, states = {}, {}
    for k in (1, 4):
        model = method.apply(build(config), {"k": k, "loss": "ce", "calibration_batches": 1}, task_for(config))
        method.calibrate(model, calibration(config))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        model(**batch(config)).loss.backward()
        optimizer.step()
        states[k] = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
        method.save(model, tmp_path / str(k))
        sizes[k] = (tmp_path / str(k) / "adapter.safetensors").stat().st_size
    selected = {k: k * sum(m.base.out_features for m in model.modules() if isinstance(m, GpsLinear)) for k in (1, 4)}
    # Adam keeps two moments per trained entry: the K entries, the biases and the head, nothing dense.
    assert states[4] - states[1] == 2 * (selected[4] - selected[1])
    dense = sum(m.base.weight.numel() for m in model.modules() if isinstance(m, GpsLinear))
    # Each selected entry costs a 4-byte value and an 8-byte index in the file.
    assert sizes[4] - sizes[1] == pytest.approx(12 * (selected[4] - selected[1]), rel=0.01)
    assert sizes[4] < 4 * dense / 2


def test_sparse_budgets_out_of_reach_are_refused():
    config = BERT()
    model, task = build(config), task_for(config)
    (problem,) = get_method("gps").check_applicable(model, {"k": 33}, task)
    assert "k=33 exceeds the inputs" in problem
    (problem,) = get_method("spt").check_applicable(model, {"params": 10**7}, task)
    assert "params=10,000,000 exceeds" in problem
    from peftlab.workers.methods import TaskInfo

    with pytest.raises(UserError, match="supcon needs one representation per example"):
        get_method("gps").apply(model, {"loss": "supcon"}, TaskInfo("causal-lm", 0, ()))
    # Multiple choice has a head, but it reads one representation per answer: refused before any
    # work, and `auto` passes with the task's own loss there.
    choices = TaskInfo("multiple-choice", 3, ("classifier",))
    (problem,) = get_method("gps").check_applicable(model, {"loss": "supcon"}, choices)
    assert "multiple-choice tasks have none" in problem
    assert get_method("gps").check_applicable(model, {}, choices) == []
    assert not get_method("gps")._uses_supcon(get_method("gps").resolve({}), choices)


@pytest.mark.parametrize("name, hparams", [
    ("gps", {"k": 2, "loss": "ce", "calibration_batches": 2}),
    ("spt", {"params": 1500, "r": 2, "lora_share": 0.1, "calibration_batches": 2}),
    ("peft_debias", {"r": 2, "debias_r": 2, "debias_steps": 4, "debias_batch_size": 8}),
])
def test_a_resumed_trial_takes_its_calibration_from_the_checkpoint(name, hparams, tiny_bert_dir, people_csv, tmp_path):
    """A retried or resumed trial does not read the data again: the checkpoint holds the selection (or
    the frozen first stage) and the calibration time, and training ends as the uninterrupted one."""
    from peftlab.spec import parse_spec
    from peftlab.workers import checkpoint
    from peftlab.workers.train import Stepper, TrialLoop
    from peftlab.workers.trial import TrialContext, prepare_trial

    hparams = {**hparams, "lr": 5e-3}
    training = {"max_steps": 8, "batch_size": 16, "eval_every": 4, "seeds": [0], "checkpoint_every": 1}
    spec = parse_spec({"name": "cal", "model": str(tiny_bert_dir),
                       "tasks": [{"dataset": str(people_csv), "max_eval_samples": 32, "retention": False}],
                       "methods": {name: hparams}, "training": training})
    context = TrialContext(experiment="cal", model=str(tiny_bert_dir), task=spec.tasks[0], training=spec.training,
                           adapters_dir="/nonexistent", data_dir=None, cpus=1, gpus=0)
    owner = {"experiment": "cal", "trial_id": "t"}

    def run(resume=None):
        trial = prepare_trial({"method": name, name: hparams, "seed": 0}, context, calibrate=resume is None)
        records, saved = [], {}

        def keep(record, write) -> None:
            folder = tmp_path / f"{id(trial)}-{record.step}"
            write(folder)
            checkpoint.claim(folder, owner)
            saved[record.step] = folder
            records.append(record)

        TrialLoop(task=trial.task, settings=trial.settings, stepper=Stepper(trial.model, trial.settings, trial.device),
                  seed=trial.seed, static=trial.static, report=records.append, save=None, adapter_dir=None,
                  checkpoint=keep, checkpoint_every=1, resume=resume, reshaping=trial.reshaping(),
                  figures=dict(trial.figures)).train()
        return trial, records, saved

    first, records, saved = run()
    assert first.static.calibration_seconds > 0 and records[-1].figures
    again, later, _ = run(resume=saved[4])
    assert again.static.calibration_seconds == 0  # the data was not read again
    assert later[-1].costs.calibration_seconds == records[-1].costs.calibration_seconds
    assert later[-1].figures == records[-1].figures
    assert later[-1].metrics == pytest.approx(records[-1].metrics, abs=1e-6)
    method = get_method(name)
    assert method.structure(again.model) == method.structure(first.model)
    ours, theirs = first.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
