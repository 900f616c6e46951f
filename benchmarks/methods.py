"""Train-step time and peak memory of every registered method on MiniLM, relative to LoRA r=8.

Each method runs in its own process (so its memory high-water mark is its own) on the same
fixed batch of 32 SST-2 sentences; a plain forward pass is measured the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH = 32
REFERENCE = "lora"
FORWARD = "(forward only)"


def measure(method_name: str, steps: int, warmup: int, threads: int) -> dict:
    """One method in this process: apply it sized like LoRA r=8, time `steps` AdamW steps."""
    import torch
    from transformers import AutoTokenizer

    from peftlab import settings
    from peftlab.workers.data import SplitOptions, load_text_classification
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.models import head_modules, load_classifier, meta_classifier, resolve_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = load_text_classification("sst2", options=SplitOptions(max_train_samples=BATCH), data_dir=settings.data_dir())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    batch = tokenizer(data.train_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch["labels"] = torch.tensor(data.train_labels)
    model, _ = load_classifier("minilm", 2)
    task = TaskInfo("text-classification", 2, head_modules(model))
    shapes = meta_classifier("minilm", 2)
    budget = get_method(REFERENCE).expected_trainable(shapes, {"r": 8}, task)

    hparams: dict = {}
    if method_name != FORWARD:
        method = get_method(method_name)
        if any(h.size for h in method.hparams):
            # The same trainable budget as LoRA r=8, unless that size does not fit the model.
            sized = method.size_for_budget(shapes, {}, task, budget)
            hparams = {} if method.check_applicable(shapes, sized, task) else sized
        model = method.apply(model, hparams, task)
    model.train()  # dropout on, as in training: some methods pay for it (see DoRA)
    params = [p for p in model.parameters() if p.requires_grad and method_name != FORWARD]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        if method_name == FORWARD:
            with torch.no_grad():
                model(**batch)
        else:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method_name, "hparams": {k: v for k, v in hparams.items() if k not in ("lr", "weight_decay")},
        "trainable": sum(p.numel() for p in params), "step_s": statistics.median(times),
        # Growth of the high-water mark while training: activations, gradients, optimizer state.
        "train_memory_bytes": max(0, peak - rss_before) * 1024, "peak_rss_bytes": peak * 1024,
    }


def run_one(name: str, args) -> dict:
    command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"method": name, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", help="methods to measure (default: every registered one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the timings steady)")
    parser.add_argument("--smoke", action="store_true", help="lora, dora and a forward pass, 4 steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.threads)))
        return
    from peftlab.workers.methods import all_methods

    names = args.methods or list(all_methods())
    if args.smoke:
        names, args.steps, args.warmup = ["lora", "dora"], 4, 1
    names = [FORWARD, REFERENCE] + [n for n in names if n != REFERENCE]
    rows = []
    for name in names:
        rows.append(run_one(name, args))
        print(f"measured {name}", file=sys.stderr)
    ref = next(r for r in rows if r["method"] == REFERENCE)
    fwd = next(r for r in rows if r["method"] == FORWARD)
    print(f"\nMiniLM, batch of {BATCH} SST-2 sentences, {args.threads} thread(s), median of {args.steps} steps; "
          f"sizes matched to LoRA r=8 ({ref['trainable']:,} trainable) where the method has a size")
    print(f"{'method':<15}{'trainable':>12}{'step ms':>9}{'x LoRA':>8}{'x fwd':>7}{'train MiB':>11}{'x LoRA':>8}  size")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<15}  failed: {r['error']}")
            continue
        mem_ratio = r["train_memory_bytes"] / ref["train_memory_bytes"] if ref["train_memory_bytes"] else float("nan")
        print(f"{r['method']:<15}{r['trainable']:>12,}{1000 * r['step_s']:>9.1f}{r['step_s'] / ref['step_s']:>8.2f}"
              f"{r['step_s'] / fwd['step_s']:>7.2f}{r['train_memory_bytes'] / 2**20:>11.0f}{mem_ratio:>8.2f}  "
              f"{', '.join(f'{k}={v}' for k, v in r['hparams'].items() if k != 'target_modules')}")


if __name__ == "__main__":
    main()
