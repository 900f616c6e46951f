"""Train-step time and peak memory of every registered method on MiniLM, relative to LoRA r=8.

Each method runs in its own process (so its memory high-water mark is its own) on the same
fixed batch of 32 SST-2 sentences; a plain forward pass is measured the same way. A method that
calibrates on the data first (GPS, SPT, PEFTDebias) does so in a process of its own, timed and
measured apart, and hands its selection over as a saved adapter; a method that prunes (Light-PEFT)
estimates during the warm-up steps, prunes, and is timed on the pruned model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32
CORPUS = 2000
"""SST-2 training sentences a calibration may read (PEFTDebias builds its corpus from them)."""
REFERENCE = "lora"
FORWARD = "(forward only)"


def setup(method_name: str, threads: int):
    """MiniLM with the method applied (sized like LoRA r=8), the fixed batch, the method, its
    hyperparameters and what calibration reads (the SST-2 training sentences)."""
    import torch
    from transformers import AutoTokenizer

    from peftlab import settings
    from peftlab.workers.data import SplitOptions, load_text_classification
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.models import head_modules, load_classifier, meta_classifier, resolve_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = load_text_classification("sst2", options=SplitOptions(max_train_samples=CORPUS), data_dir=settings.data_dir())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    batch = tokenizer(data.train_texts[:BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch["labels"] = torch.tensor(data.train_labels[:BATCH])
    model, _ = load_classifier("minilm", 2)
    task = TaskInfo("text-classification", 2, head_modules(model))
    shapes = meta_classifier("minilm", 2)
    budget = get_method(REFERENCE).expected_trainable(shapes, {"r": 8}, task)
    method, hparams = None, {}
    if method_name != FORWARD:
        method = get_method(method_name)
        if any(h.size for h in method.hparams):
            # The same trainable budget as LoRA r=8, unless that size does not fit the model.
            sized = method.size_for_budget(shapes, {}, task, budget)
            hparams = {} if method.check_applicable(shapes, sized, task) else sized
        model = method.apply(model, hparams, task)
    return model, batch, method, hparams, data.train_texts, tokenizer


def calibrate(method_name: str, threads: int, folder: str) -> dict:
    """Calibrate in this process and save the adapter it selected into `folder`."""
    import itertools

    from peftlab.workers.methods import Calibration

    model, batch, method, _, texts, tokenizer = setup(method_name, threads)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    method.calibrate(model, Calibration(batches=itertools.repeat(batch), texts=texts, processor=tokenizer,
                                        model_name="minilm"))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method.save(model, folder)
    return {"calibration_s": seconds, "calibration_memory_bytes": max(0, peak - rss_before) * 1024}


def measure(method_name: str, steps: int, warmup: int, threads: int, selected: str | None = None) -> dict:
    """One method in this process: apply it sized like LoRA r=8 (with the selection a calibration
    saved in `selected`), time `steps` AdamW steps."""
    import torch

    model, batch, method, hparams, _, _ = setup(method_name, threads)
    if selected:
        from safetensors.torch import load_file

        from peftlab.workers.methods.base import ADAPTER_META, ADAPTER_WEIGHTS

        if (structure := json.loads((Path(selected) / ADAPTER_META).read_text()).get("structure")) is not None:
            method.restructure(model, structure)
        model.load_state_dict(load_file(str(Path(selected) / ADAPTER_WEIGHTS)), strict=False)
    model.train()  # dropout on, as in training: some methods pay for it (see DoRA)
    params = [p for p in model.parameters() if p.requires_grad and method_name != FORWARD]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times, note = [], ""
    for step in range(warmup + steps):
        started = time.perf_counter()
        if method_name == FORWARD:
            with torch.no_grad():
                model(**batch)
        else:
            model(**batch).loss.backward()
            optimizer.step()
            method.on_step(model, step + 1, warmup + steps)
            optimizer.zero_grad(set_to_none=True)
        if step + 1 == warmup and method is not None and method.prunes:
            # The warm-up steps were its estimation stage: time the pruned model that trains on.
            removed = method.prune(model)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            note = "pruned " + ", ".join(f"{k.split('/')[-1]} {v:.0%}" for k, v in removed.items()
                                         if k.split("/")[-1] in ("heads", "neurons"))
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method_name, "hparams": {k: v for k, v in hparams.items() if k not in ("lr", "weight_decay")},
        "trainable": sum(p.numel() for p in params), "step_s": statistics.median(times), "note": note,
        # Growth of the high-water mark while training: activations, gradients, optimizer state.
        "train_memory_bytes": max(0, peak - rss_before) * 1024, "peak_rss_bytes": peak * 1024,
    }


def _child(*extra: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_one(name: str, args) -> dict:
    from peftlab.workers.methods import get_method

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    try:
        if name != FORWARD and get_method(name).calibrates:
            with tempfile.TemporaryDirectory() as folder:
                calibration = _child("--calibrate", name, "--selected", folder, *common)
                return {**_child("--one", name, "--selected", folder, *common), **calibration}
        return _child("--one", name, *common)
    except RuntimeError as exc:
        return {"method": name, "error": str(exc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="methods to measure (default: every registered one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the timings steady)")
    parser.add_argument("--smoke", action="store_true", help="lora, dora, gps and a forward pass, 4 steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", help=argparse.SUPPRESS)
    parser.add_argument("--selected", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibrate:
        print(json.dumps(calibrate(args.calibrate, args.threads, args.selected)))
        return
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.threads, args.selected)))
        return
    from peftlab.workers.methods import all_methods

    names = args.methods or list(all_methods())
    if args.smoke:
        names, args.steps, args.warmup = ["lora", "dora", "gps"], 4, 1
    names = [FORWARD, REFERENCE] + [n for n in names if n != REFERENCE]
    rows = []
    for name in names:
        rows.append(run_one(name, args))
        print(f"measured {name}", file=sys.stderr)
    ref = next(r for r in rows if r["method"] == REFERENCE)
    fwd = next(r for r in rows if r["method"] == FORWARD)
    print(f"\nMiniLM, batch of {BATCH} SST-2 sentences, {args.threads} thread(s), median of {args.steps} steps; "
          f"sizes matched to LoRA r=8 ({ref['trainable']:,} trainable) where the method has a size")
    print(f"{'method':<15}{'trainable':>12}{'step ms':>9}{'x LoRA':>8}{'x fwd':>7}{'train MiB':>11}{'x LoRA':>8}"
          f"{'calib s':>9}{'calib MiB':>11}  size")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<15}  failed: {r['error']}")
            continue
        mem_ratio = r["train_memory_bytes"] / ref["train_memory_bytes"] if ref["train_memory_bytes"] else float("nan")
        calibration = (f"{r['calibration_s']:>9.1f}{r['calibration_memory_bytes'] / 2**20:>11.0f}"
                       if "calibration_s" in r else f"{'':>20}")
        size = ", ".join(f"{k}={v}" for k, v in r["hparams"].items() if k != "target_modules")
        print(f"{r['method']:<15}{r['trainable']:>12,}{1000 * r['step_s']:>9.1f}{r['step_s'] / ref['step_s']:>8.2f}"
              f"{r['step_s'] / fwd['step_s']:>7.2f}{r['train_memory_bytes'] / 2**20:>11.0f}{mem_ratio:>8.2f}"
              f"{calibration}  {'; '.join(filter(None, [size, r.get('note', '')]))}")
    full = next((r for r in rows if r["method"] == "full" and "error" not in r), None)
    for r in rows:
        if full and r["method"] in ("gps", "spt") and "error" not in r:
            print(f"{r['method']} trains in {r['train_memory_bytes'] / full['train_memory_bytes']:.2f}x the memory "
                  f"full fine-tuning does (goal: below 1)")


if __name__ == "__main__":
    main()
