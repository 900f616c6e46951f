"""Shared fixtures: the real data folder, a tiny BERT saved like a Hub model, generated data,
a throwaway PostgreSQL database and a clean PEFTLAB_HOME."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = (ROOT.parent / "shared" / "datasets").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("PEFTLAB_DATA_DIR") or SHARED_DATA)
    if not (path / "text" / "sst2").is_dir():
        pytest.skip(f"real data sets not found at {path} (set PEFTLAB_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights, saved with MiniLM's tokenizer."""
    from peftlab.workers.synthetic import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    from peftlab.workers.synthetic import write_sentiment_csv

    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv", 400)


@pytest.fixture
def peftlab_home(tmp_path, monkeypatch) -> Path:
    """A fresh PEFTLAB_HOME with no store, MLflow or Ray settings leaking in from outside."""
    home = tmp_path / "runs"
    monkeypatch.setenv("PEFTLAB_HOME", str(home))
    for name in ("PEFTLAB_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return home


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new database on the PostgreSQL server at 127.0.0.1:5432, dropped on exit; yields its name
    (the test is skipped when the server does not answer)."""
    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                                autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {' '.join(str(exc).split())}")
    name = f"{prefix}_{uuid.uuid4().hex}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL server at 127.0.0.1:5432, dropped afterwards."""
    with fresh_database("peftlab_test") as name:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights (MiniLM's tokenizer, [SEP] as end of sequence)."""
    from peftlab.workers.synthetic import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama-style decoder with random weights (MiniLM's tokenizer)."""
    from peftlab.workers.synthetic import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def instructions_jsonl(tmp_path_factory) -> Path:
    from peftlab.workers.synthetic import write_instructions_jsonl

    return write_instructions_jsonl(tmp_path_factory.mktemp("data") / "instructions.jsonl", 200)


@pytest.fixture(scope="session")
def tiny_bert_mlm_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a masked-LM head (random weights), saved with MiniLM's tokenizer."""
    from peftlab.workers.synthetic import save_tiny_bert_mlm

    return save_tiny_bert_mlm(tmp_path_factory.mktemp("tiny-bert-mlm"))


@pytest.fixture(scope="session")
def people_csv(tmp_path_factory) -> Path:
    """Generated sentiment sentences that each hold a gendered word (a corpus for counterfactual swaps)."""
    from peftlab.workers.synthetic import write_sentiment_csv

    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "people.csv", 240, people=True)


BACKBONE_STEPS = 12
"""Steps of the backbones the suite builds: enough for the loss to fall, seconds each."""


@pytest.fixture(scope="session")
def built_backbones(tmp_path_factory, data_dir) -> Path:
    """peftlab's decoder and ViT built by their recipes with a few steps each, under PEFTLAB_BACKBONES
    for the whole session (trials started by the CLI inherit it)."""
    from peftlab.workers import backbones

    folder = tmp_path_factory.mktemp("backbones")
    os.environ["PEFTLAB_BACKBONES"] = str(folder)
    for name in backbones.BACKBONES:
        backbones.build(name, steps=BACKBONE_STEPS, data_dir=data_dir)
    return folder
