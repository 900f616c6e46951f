"""GPU benchmark: LoRA on a ~1 B-parameter Llama-style decoder at fp32, bf16, bf16 with gradient
checkpointing and 4-bit QLoRA, beside full fine-tuning in bf16; tokens/s and peak memory, ratios to fp32.

Needs only torch, transformers and peft (bitsandbytes for QLoRA, skipped with the reason where it
cannot run): the model is built from a config with random weights, so nothing is downloaded.

    python benchmarks/gpu.py                    # on a CUDA GPU, about ten minutes at most
    python benchmarks/gpu.py --tiny --steps 3   # a small model on the CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time
from dataclasses import dataclass

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Setting:
    name: str
    method: str  # lora | full
    weights: torch.dtype
    autocast: torch.dtype | None
    checkpointing: bool = False
    four_bit: bool = False


SETTINGS = (
    Setting("lora fp32", "lora", torch.float32, None),
    Setting("lora bf16", "lora", torch.bfloat16, torch.bfloat16),
    Setting("lora bf16 + grad. checkpointing", "lora", torch.bfloat16, torch.bfloat16, checkpointing=True),
    Setting("qlora 4-bit nf4 + grad. checkpointing", "lora", torch.bfloat16, torch.bfloat16, checkpointing=True,
            four_bit=True),
    Setting("full fine-tuning bf16", "full", torch.bfloat16, torch.bfloat16),
)


def llama_config(tiny: bool, layers: int | None):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    # TinyLlama-1.1B's shape: 22 layers of width 2048, grouped-query attention, SwiGLU.
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers or 22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)


def four_bit_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # not installed, or its native library does not load
        return f"bitsandbytes unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def build(setting: Setting, config, device: torch.device) -> torch.nn.Module:
    """The model with random weights, then (for LoRA) the adapters; QLoRA quantizes the frozen base."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if setting.four_bit:
        model = load_four_bit(config, setting.weights)
    else:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(setting.weights)
    if setting.checkpointing and not setting.four_bit:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if setting.method == "full":
        return model.train()
    from peft import LoraConfig, get_peft_model

    if setting.four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setting.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def load_four_bit(config, dtype: torch.dtype) -> torch.nn.Module:
    """Save the random model, then load it as a checkpoint is loaded for QLoRA: NF4 with double
    quantization through BitsAndBytesConfig (the path peftlab's `quantization` key takes)."""
    import tempfile

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype,
                                                device_map={"": torch.cuda.current_device()})


def measure(setting: Setting, config, device: torch.device, *, batch: int, seq: int, steps: int, warmup: int) -> dict:
    model = build(setting, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    trainable = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(0)
    autocast = (torch.autocast(device.type, dtype=setting.autocast) if setting.autocast
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = 0.0
    for step in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            elapsed += time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": batch * seq * steps / elapsed, "peak_bytes": peak, "trainable": trainable,
            "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model (for a CPU check of the script)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 22, tiny: 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(args.tiny, args.layers)
    seq = args.seq or (64 if args.tiny else 1024)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        size = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA GPU)"
    print(f"device: {gpu}; torch {torch.__version__}; Llama-style decoder, {size / 1e9:.3f} B parameters, "
          f"batch {args.batch} x {seq} tokens, {args.steps} timed steps after {args.warmup}")
    print(f"{'setting':<40} {'trainable':>14} {'tokens/s':>10} {'x fp32':>7} {'peak memory':>12} {'x fp32':>7}")
    reference = None
    for setting in SETTINGS:
        if setting.four_bit and (reason := four_bit_problem(device)):
            print(f"{setting.name:<40} skipped: {reason}")
            continue
        if setting.autocast is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            print(f"{setting.name:<40} skipped: this GPU has no bf16")
            continue
        result = measure(setting, config, device, batch=args.batch, seq=seq, steps=args.steps, warmup=args.warmup)
        reference = reference or result
        speed = result["tokens_per_s"] / reference["tokens_per_s"]
        peak = f"{result['peak_bytes'] / 2**30:.2f} GiB" if result["peak_bytes"] else "-"
        memory = f"{result['peak_bytes'] / reference['peak_bytes']:.2f}" if result["peak_bytes"] else "-"
        print(f"{setting.name:<40} {result['trainable']:>14,} {result['tokens_per_s']:>10.0f} {speed:>7.2f} "
              f"{peak:>12} {memory:>7}", flush=True)


if __name__ == "__main__":
    main()
