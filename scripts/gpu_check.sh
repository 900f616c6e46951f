#!/usr/bin/env bash
# On a GPU host: LoRA trials in a single process (fp32, bf16) and as a DeepSpeed ZeRO-2 trial (one
# Ray Train worker, bf16), on MiniLM + SST-2 with one GPU; prints samples/s, steps/s and peak GPU memory.
# Usage: scripts/gpu_check.sh [--cpu]   (--cpu: the same two trials, shrunk, on CPU)
# Needs SST-2 under $PEFTLAB_DATA_DIR (default ../shared/datasets) or the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PEFTLAB_DATA_DIR:-}" ] && [ -d ../shared/datasets ]; then
  export PEFTLAB_DATA_DIR=$(cd ../shared/datasets && pwd)
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false RAY_AIR_NEW_OUTPUT=0
exec .venv/bin/python - "$@" <<'EOF'
import sys
import tempfile

import torch

cpu = "--cpu" in sys.argv[1:]
if not cpu and not torch.cuda.is_available():
    print("error: no CUDA GPU visible to torch; run on a GPU host, or pass --cpu for a shrunk CPU run", file=sys.stderr)
    sys.exit(2)

import ray
from ray import tune

from peftlab import settings
from peftlab.spec import parse_spec
from peftlab.workers.distributed import run_distributed_trial
from peftlab.workers.report import TrialReport
from peftlab.workers.trial import TrialContext, run_trial

steps, batch, samples = (10, 16, 256) if cpu else (200, 32, None)


def spec_for(precision: str):
    return parse_spec({
        "name": "gpu-check", "model": "minilm",
        "tasks": [{"dataset": "sst2", "max_train_samples": samples, "max_eval_samples": samples}],
        "methods": {"lora": {}},
        "training": {"max_steps": steps, "eval_every": steps, "batch_size": batch, "precision": precision},
        "resources": {"gpus_per_trial": 0 if cpu else 1},
    })


gpus = 0 if cpu else 1
config = {"method": "lora", "lora": {"r": 8, "lr": 5.0e-4}, "seed": 0}
ray.init(include_dashboard=False, log_to_driver=False)
with tempfile.TemporaryDirectory() as scratch:
    data_dir = settings.data_dir()

    def context_for(spec):
        task = spec.tasks[0]
        return TrialContext(experiment="gpu-check", model=spec.model_for(task), task=task, training=spec.training,
                            adapters_dir=f"{scratch}/adapters", data_dir=str(data_dir) if data_dir else None,
                            cpus=1 if cpu else 4, gpus=gpus)

    fp32, bf16 = spec_for("fp32"), spec_for("fp32" if cpu else "bf16")
    deepspeed = bf16.deepspeed.model_copy(update={"zero_stage": 2})
    cases = {
        "lora, one process (fp32)": tune.with_resources(
            tune.with_parameters(run_trial, context=context_for(fp32)), {"cpu": 1 if cpu else 4, "gpu": gpus}),
        f"lora, one process ({bf16.training.precision})": tune.with_resources(
            tune.with_parameters(run_trial, context=context_for(bf16)), {"cpu": 1 if cpu else 4, "gpu": gpus}),
        f"lora, DeepSpeed ZeRO-2, 1 worker ({bf16.training.precision})": tune.with_resources(
            tune.with_parameters(run_distributed_trial, context=context_for(bf16), resources=bf16.resources,
                                 deepspeed=deepspeed),
            {"cpu": 0.01}),
    }
    device = "CPU" if cpu else torch.cuda.get_device_name(0)
    print(f"MiniLM + SST-2, batch {batch}, {steps} steps, on {device}")
    for label, trainable in cases.items():
        grid = tune.Tuner(trainable, param_space=config,
                          run_config=tune.RunConfig(storage_path=f"{scratch}/ray", verbose=0)).fit()
        result = grid[0]
        if result.error:
            print(f"{label}: FAILED: {result.error}")
            continue
        report = TrialReport.from_result(result.metrics)
        speed = report.costs.samples_per_second
        print(f"{label}: {speed:.1f} samples/s, {speed / batch:.2f} steps/s, "
              f"peak memory {report.costs.peak_memory_bytes / 2**30:.2f} GiB, "
              f"validation/accuracy {report.metrics['accuracy']:.3f}")
EOF
