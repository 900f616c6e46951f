"""ETHER against LoRA on real text data, side by side in one run: MiniLM on SST-2 and Banking77
(2,000 training sentences, 300 steps of batch 16), validation accuracy of the last step.

ETHER rows differ in the start of their vectors (kaiming-uniform as in the reference code, or the
standard normal peftlab used before), the learning rate and the number of blocks, which is what
decides whether ETHER learns in a short run.

    .venv/bin/python benchmarks/ether.py [--steps 300] [--train 2000] [--datasets sst2 banking77]
"""
from __future__ import annotations

import argparse
import copy
import time

ROWS = [
    ("lora", {}, None),
    ("ether", {"lr": 3e-3}, "normal"),
    ("ether", {"lr": 3e-3}, None),
    ("ether", {"lr": 1e-2}, None),
    ("ether", {"lr": 3e-3, "n_blocks": 32}, None),
    ("ether", {"lr": 3e-2}, "normal"),
]


def restart_vectors_normal(model) -> None:
    """ETHER's vectors redrawn from a standard normal (the previous start: norm about sqrt(k))."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ether_u" in name:
                p.normal_()


def run(dataset: str, steps: int, train_size: int, threads: int) -> list[dict]:
    import torch

    from peftlab import settings
    from peftlab.workers.data import SplitOptions, load_text_classification
    from peftlab.workers.methods import TaskInfo, get_method
    from peftlab.workers.models import head_modules, load_classifier
    from peftlab.workers.tasks.text_classification import TextClassificationTask
    from peftlab.workers.train import LoopSettings, train

    torch.set_num_threads(threads)
    data = load_text_classification(dataset, options=SplitOptions(max_train_samples=train_size, max_eval_samples=500),
                                    data_dir=settings.data_dir())
    torch.manual_seed(0)
    base, tokenizer = load_classifier("minilm", data.num_labels)
    head = head_modules(base)
    task = TextClassificationTask(data, tokenizer, max_length=64, head=head)
    out = []
    for name, hparams, start in ROWS:
        method = get_method(name)
        torch.manual_seed(0)
        model = method.apply(copy.deepcopy(base), hparams, TaskInfo("text-classification", data.num_labels, head))
        if start == "normal":
            restart_vectors_normal(model)
        hp = method.resolve(hparams)
        loop = LoopSettings(max_steps=steps, batch_size=16, eval_batch_size=64, eval_every=steps, warmup_ratio=0.06,
                            max_grad_norm=1.0, lr=hp["lr"], weight_decay=0.0, select="last", metric="accuracy",
                            mode="max")
        began = time.perf_counter()
        last = train(model, task, loop, seed=0, device=torch.device("cpu"))
        shown = ", ".join(f"{k}={v}" for k, v in hparams.items() if k != "lr")
        out.append({"dataset": dataset, "method": name, "lr": hp["lr"], "start": start or "kaiming-uniform",
                    "settings": shown or "-", "accuracy": last.selected_metrics["accuracy"],
                    "seconds": time.perf_counter() - began})
        print(f"{dataset:10s} {name:6s} lr={hp['lr']:<7g} {out[-1]['start']:16s} {out[-1]['settings']:12s} "
              f"validation accuracy {out[-1]['accuracy']:.4f}  ({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--datasets", nargs="+", default=["sst2", "banking77"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [row for dataset in args.datasets for row in run(dataset, args.steps, args.train, args.threads)]
    lora = {r["dataset"]: r["accuracy"] for r in rows if r["method"] == "lora"}
    print("\ndataset     method  lr       vectors start     settings      accuracy  vs LoRA")
    for r in rows:
        print(f"{r['dataset']:11s} {r['method']:7s} {r['lr']:<8g} {r['start']:17s} {r['settings']:13s} "
              f"{r['accuracy']:.4f}    {r['accuracy'] - lora[r['dataset']]:+.4f}")


if __name__ == "__main__":
    main()
