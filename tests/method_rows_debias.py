"""Contract-table rows of PEFTDebias on the shapes with a pre-training objective (BERT-style masked
LM, GPT-2 and Llama-style next token): its first stage runs on a tiny word-level corpus."""
from __future__ import annotations

import itertools

from method_rows_architectures import on_defaults
from method_table import Case, in_any_head
from peftlab.workers.methods import Calibration
from tiny_models import TINY_TEXTS, batch, tiny_tokenizer


def corpus_calibration(config) -> Calibration:
    return Calibration(batches=(batch(config, seed=100 + i) for i in itertools.count()), texts=list(TINY_TEXTS),
                       processor=tiny_tokenizer(), model_name=config, max_length=16)


def owns(n: str) -> bool:
    return in_any_head(n) or "task_A" in n or "task_B" in n


ROWS = [
    Case("peft_debias", {"r": 2, "debias_r": 3, "debias_steps": 3, "debias_batch_size": 4, "dropout": 0.0},
         on_defaults(lambda d_in, d_out: 2 * (d_in + d_out)), owns, calibration=corpus_calibration,
         shapes=("bert", "roberta", "gpt2", "llama")),
]
