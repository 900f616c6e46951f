"""The one training loop: gradient accumulation, bf16 autocast, gradient checkpointing and the typed
record a trial reports, on tiny BERT and Llama-style models built from configs (CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftlab.spec import parse_spec
from peftlab.workers.report import Costs, Outcome, TrialReport
from peftlab.workers.train import Stepper, TrialLoop
from peftlab.workers.trial import TrialContext, prepare_trial

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory) -> Path:
    """Without dropout a trial is a function of its seed and data order only: the same batch cut
    into micro-batches must then give the same gradients."""
    from peftlab.workers.synthetic import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def prepared(model: Path, data: Path, training: dict, *, task: dict | None = None, method: str = "lora",
             hparams: dict | None = None, metric: str = "validation/loss", mode: str = "min", **spec_keys):
    spec = parse_spec({"name": "loop", "model": str(model),
                       "tasks": [{"dataset": str(data), "max_eval_samples": 32, "retention": False, **(task or {})}],
                       "methods": {method: {}},
                       "training": {"eval_every": 1000, "log_every": 1, "seeds": [0], **training}, **spec_keys})
    context = TrialContext(experiment="loop", model=str(model), task=spec.tasks[0], training=spec.training,
                           adapters_dir="/nonexistent", data_dir=None, cpus=1, gpus=0, model_dtype=spec.model_dtype,
                           metric=metric, mode=mode)
    return prepare_trial({"method": method, method: hparams or {"r": 4, "dropout": 0.0}, "seed": 0}, context)


def run(trial) -> list[TrialReport]:
    records: list[TrialReport] = []
    stepper = Stepper(trial.model, trial.settings, trial.device)
    TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed, static=trial.static,
              report=records.append, save=None, adapter_dir=None).train()
    return records


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulating_micro_batches_equals_one_batch(bert_without_dropout, sentiment_csv):
    lora = {"r": 4, "dropout": 0.0, "lr": 5e-3}
    one = prepared(bert_without_dropout, sentiment_csv, {"max_steps": 12, "batch_size": 16}, hparams=lora)
    four = prepared(bert_without_dropout, sentiment_csv,
                    {"max_steps": 12, "batch_size": 16, "gradient_accumulation_steps": 4}, hparams=lora)
    assert four.settings.accumulation == 4
    losses_one = [r.train_loss for r in run(one)]
    losses_four = [r.train_loss for r in run(four)]
    assert len(losses_one) == 12
    assert losses_four == pytest.approx(losses_one, abs=1e-5)
    assert losses_one[-1] < losses_one[0]  # it trains
    a, b = trainable(one.model), trainable(four.model)
    assert a.keys() == b.keys() and len(a) > 0
    assert max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a) < 1e-4


def test_bf16_autocast_trains_on_cpu_and_tracks_fp32(tiny_bert_dir, sentiment_csv):
    # Full fine-tuning learns this random tiny BERT's task within 60 steps (the loss falls after 35).
    fp32 = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 60, "batch_size": 16}, method="full",
                    hparams={"lr": 3e-3})
    bf16 = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 60, "batch_size": 16, "precision": "bf16"},
                    method="full", hparams={"lr": 3e-3})
    seen: set[torch.dtype] = set()
    query = next(m for n, m in bf16.model.named_modules() if n.endswith("attention.self.query"))
    query.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    losses_bf16 = [r.train_loss for r in run(bf16)]
    losses_fp32 = [r.train_loss for r in run(fp32)]
    assert seen == {torch.bfloat16}  # the matmuls really ran in bf16
    assert all(p.dtype == torch.float32 for p in trainable(bf16.model).values())  # the weights did not
    def late(losses):
        return sum(losses[-5:]) / 5

    assert late(losses_bf16) < losses_bf16[0] - 0.3, losses_bf16
    assert late(losses_fp32) < losses_fp32[0] - 0.3, losses_fp32
    # Step by step they agree until the loss falls off its cliff, which the two cross a step or two apart.
    assert losses_bf16[:30] == pytest.approx(losses_fp32[:30], abs=0.03)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(family, tiny_bert_dir, tiny_llama_dir, sentiment_csv,
                                                         instructions_jsonl):
    model, data, task = ((tiny_bert_dir, sentiment_csv, {}) if family == "bert" else
                         (tiny_llama_dir, instructions_jsonl, {"type": "causal-lm"}))
    gradients, forwards = [], []
    for checkpointing in (False, True):
        trial = prepared(model, data, {"max_steps": 1, "batch_size": 8, "gradient_checkpointing": checkpointing},
                         task=task)
        block = next(m for n, m in trial.model.named_modules() if n.endswith(("layers.0", "layer.0")))
        calls = []
        inner = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        inner.register_forward_hook(lambda module, args, out: calls.append(1))
        batch = next(trial.task.train_batches(8, 0))
        trial.model.train()
        torch.manual_seed(0)  # the same dropout masks, replayed by the recompute
        trial.model(**batch).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in trial.model.named_parameters() if p.requires_grad})
        forwards.append(len(calls))
    assert forwards == [1, 2]  # with checkpointing the block's layers ran again in the backward pass
    without, with_ = gradients
    assert without.keys() == with_.keys() and len(without) > 0
    for name in without:
        torch.testing.assert_close(with_[name], without[name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_dtype_loads_weights_in_that_dtype(tiny_bert_dir, sentiment_csv):
    trial = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 2, "batch_size": 8}, model_dtype="bfloat16")
    frozen = {p.dtype for p in trial.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    records = run(trial)
    assert records[-1].outcome is Outcome.COMPLETED and all(r.train_loss is not None for r in records)


def test_the_record_survives_a_tune_result_and_says_how_the_trial_ended(tiny_bert_dir, sentiment_csv):
    trial = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 2})
    records = run(trial)
    assert [(r.step, r.is_evaluation, r.outcome) for r in records] == [
        (2, False, None), (3, True, None), (4, False, None), (6, True, Outcome.COMPLETED)]
    last = records[-1]
    result = last.to_result()
    assert result["step"] == 6 and result["validation/accuracy"] == last.selected_metrics["accuracy"]
    again = TrialReport.from_result(result)
    assert again == last and isinstance(again.costs, Costs) and again.outcome is Outcome.COMPLETED
    assert again.costs.trainable_params == trial.static.trainable_params > 0
    assert again.costs.samples_per_second > 0 and again.costs.peak_memory_bytes > 0
    assert TrialReport.from_result({"step": 3, "validation/accuracy": 0.5}) is None  # not a trial's record
    progress = records[0]
    assert progress.metrics == {} and "validation/accuracy" not in progress.to_result()
    assert progress.curve() == {"train/loss": progress.train_loss}


def _validation_now(trial) -> dict[str, float]:
    return trial.task.evaluate(trial.model, 64, trial.device, split="validation")


def test_select_best_restores_that_evaluation_then_tests_it_once(tiny_bert_dir, sentiment_csv):
    """Selecting the highest validation loss (a rule that picks an early evaluation, not the last)
    shows the restore: after training, the model scores exactly what it scored at that step."""
    trial = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 30, "batch_size": 16, "eval_every": 5},
                     method="full", hparams={"lr": 3e-3}, mode="max")
    records = run(trial)
    evaluations = {r.step: r.metrics for r in records if r.is_evaluation}
    assert sorted(evaluations) == [5, 10, 15, 20, 25, 30]
    worst = max(evaluations, key=lambda step: evaluations[step]["loss"])
    last = records[-1]
    assert last.outcome is Outcome.COMPLETED and last.selected_step == worst != 30
    assert last.selected_metrics == evaluations[worst]
    assert _validation_now(trial) == pytest.approx(evaluations[worst], abs=1e-6)  # the kept weights are back
    assert last.selected_metrics != evaluations[30]
    test_now = trial.task.evaluate(trial.model, 64, trial.device, split="test")
    assert last.test_metrics == pytest.approx(test_now, abs=1e-6) and set(last.test_metrics) == {"loss", "accuracy",
                                                                                              "macro_f1"}
    # The test metrics travel in the record and the curve once, never at the top of the Tune result;
    # there the search algorithm reads the kept checkpoint's validation value, not the last one's.
    assert not any(key.startswith("test/") for key in last.to_result())
    assert last.to_result()["validation/loss"] == evaluations[worst]["loss"] != evaluations[30]["loss"]
    assert last.curve()["validation/loss"] == evaluations[30]["loss"]  # the curve keeps its last point
    assert last.curve()["test/accuracy"] == last.test_metrics["accuracy"]
    assert sum("test/accuracy" in r.curve() for r in records) == 1
    assert last.selected() == {**{f"validation/{k}": v for k, v in evaluations[worst].items()},
                               **{f"test/{k}": v for k, v in last.test_metrics.items()}}


def test_select_last_keeps_the_final_evaluation(tiny_bert_dir, sentiment_csv):
    trial = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 10, "batch_size": 16, "eval_every": 5,
                                                    "select": "last"}, mode="max")
    last = run(trial)[-1]
    assert last.selected_step == 10 and last.selected_metrics == last.metrics
    assert _validation_now(trial) == pytest.approx(last.metrics, abs=1e-6)


def test_a_rung_that_says_stop_ends_the_trial_tested_and_saved(tiny_bert_dir, sentiment_csv, tmp_path):
    trial = prepared(tiny_bert_dir, sentiment_csv, {"max_steps": 30, "batch_size": 16, "eval_every": 5})
    asked, saved = [], []
    stepper = Stepper(trial.model, trial.settings, trial.device)
    records: list[TrialReport] = []
    TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed, static=trial.static,
              report=records.append, save=lambda model, path: saved.append(path), adapter_dir=tmp_path / "adapter",
              rungs=lambda step, value: asked.append((step, value)) or step < 10).train()
    assert [step for step, _ in asked] == [5, 10]
    assert asked[1][1] == records[-1].metrics["loss"]  # the rung sees the validation metric the spec searches
    last = records[-1]
    assert last.step == 10 and last.outcome is Outcome.EARLY_STOPPED and last.test_metrics
    assert saved == [tmp_path / "adapter"] and last.selected_step in (5, 10)


def test_live_display_shows_each_running_trial_and_its_clock_ticks(tiny_bert_dir, sentiment_csv):
    import time
    from types import SimpleNamespace

    from rich.console import Console

    from peftlab.progress import SweepProgress
    from peftlab.search import plan

    spec = parse_spec({"name": "show", "model": str(tiny_bert_dir), "tasks": [{"dataset": str(sentiment_csv)}],
                       "methods": {"lora": {"r": 4}}, "search": {"num_samples": 2}})
    progress = SweepProgress(plan(spec)[0])
    trial = SimpleNamespace(trial_id="t1", config={"method": "lora", "lora": {"r": 4}})  # what Tune hands callbacks
    progress._live = SimpleNamespace(refresh=lambda: None)  # no terminal in a test
    progress.on_trial_start(0, [], trial)
    evaluation = TrialReport(step=50, max_steps=300, costs=Costs(10, 100, samples_per_second=42.5), train_loss=0.5,
                             metrics={"accuracy": 0.75})
    progress.on_trial_result(0, [], trial, evaluation.to_result())
    later = TrialReport(step=60, max_steps=300, costs=Costs(10, 100, samples_per_second=40.0), train_loss=0.4)
    progress.on_trial_result(0, [], trial, later.to_result())

    def screen() -> str:
        console = Console(width=160, record=True)
        console.print(progress._render())
        return console.export_text()

    shown = screen()
    assert "lora r=4" in shown and "60/300" in shown and "40.0" in shown and "0.4000" in shown
    assert "0.7500 at 50" in shown  # the last evaluation stays on screen between evaluations
    assert "0.7500  lora" in shown  # best so far
    progress.started = time.monotonic() - 7
    assert "7s" in screen()  # every re-draw reads the clock, with no new report
    # The terminal display asks for a fresh drawing at each refresh (once a second).
    fresh = SweepProgress(plan(spec)[0])
    fresh.started = time.monotonic() - 3
    console = Console(width=160, record=True)
    console.print(fresh.live.get_renderable())
    assert "3s" in console.export_text() and fresh.live.refresh_per_second == 1


def test_gpu_benchmark_script_runs_shrunk_on_the_cpu():
    """benchmarks/gpu.py is meant for a GPU host; its --tiny mode checks every setting's code path here."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--steps", "1", "--warmup", "0"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    for name in ("lora fp32", "lora bf16", "lora bf16 + grad. checkpointing", "full fine-tuning bf16"):
        assert name in lines and "skipped" not in lines[name], done.stdout
    assert "skipped: needs a CUDA GPU" in lines["qlora 4-bit nf4 + grad. checkpointing"]


def test_a_trial_continued_from_its_checkpoint_ends_as_an_uninterrupted_one(tiny_bert_dir, sentiment_csv, tmp_path):
    from peftlab.workers import checkpoint

    # Dropout on (tiny BERT's and LoRA's): equal results need the random state restored too.
    training = {"max_steps": 30, "batch_size": 16, "eval_every": 10, "checkpoint_every": 1}
    hparams = {"r": 4, "dropout": 0.1, "lr": 5e-3}
    owner = {"experiment": "loop", "trial_id": "t1"}

    def loop(trial, **extra) -> tuple[list[TrialReport], dict[int, Path]]:
        records, saved = [], {}

        def keep(record: TrialReport, write) -> None:
            folder = tmp_path / f"{id(trial)}-{record.step}"
            write(folder)
            checkpoint.claim(folder, owner)
            saved[record.step] = folder
            records.append(record)

        stepper = Stepper(trial.model, trial.settings, trial.device)
        TrialLoop(task=trial.task, settings=trial.settings, stepper=stepper, seed=trial.seed, static=trial.static,
                  report=records.append, save=None, adapter_dir=None, checkpoint=keep,
                  checkpoint_every=training["checkpoint_every"], **extra).train()
        return records, saved

    whole = prepared(tiny_bert_dir, sentiment_csv, training, hparams=hparams)
    records, saved = loop(whole)
    assert sorted(saved) == [10, 20]  # every evaluation but the last, which ends the trial

    resumed = prepared(tiny_bert_dir, sentiment_csv, training, hparams=hparams)
    torch.manual_seed(1234)  # a new process's random state, which the checkpoint replaces
    checkpoint.check_owner(saved[10], owner)
    later, _ = loop(resumed, resume=saved[10])
    assert later[0].resumed_from == 10 and all(r.resumed_from is None for r in later[1:])
    assert [r.step for r in later][0] == 11
    assert [r.train_loss for r in later] == pytest.approx([r.train_loss for r in records if r.step > 10], abs=1e-6)
    assert later[-1].metrics == pytest.approx(records[-1].metrics, abs=1e-6)
    assert later[-1].costs.train_seconds > records[9].costs.train_seconds  # its time so far carried on
    a, b = trainable(whole.model), trainable(resumed.model)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    # A checkpoint is only restored into the trial that wrote it.
    with pytest.raises(ValueError, match="not written by trial t2"):
        checkpoint.check_owner(saved[10], {"experiment": "loop", "trial_id": "t2"})
