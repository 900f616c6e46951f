"""Bias scores: hand-computed BBQ bias and stereotype percentages, (pseudo-)log-likelihoods of tiny
models against direct computations, an LM head that shares the adapted backbone, the loaders on
the real bias data and the refusals validation prints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, BertForMaskedLM, BertForMultipleChoice, BertForSequenceClassification,
                          BertModel, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM,
                          LlamaForSequenceClassification)

from peftlab.errors import UserError
from peftlab.workers.bias import (BIAS_EVALS, bbq_bias, bias_problems, bias_scores, crows_pairs, load_bbq,
                                  load_crows_pairs, load_winobias, stereotype_scores, winobias_scores)
from peftlab.workers.bias.data import CrowsPair, answer_roles
from peftlab.workers.bias.scores import crows_log_likelihoods, shared_positions
from peftlab.workers.lm_head import (PromptedLM, encode, lm_objective, objective_for_config, scored_positions,
                                     sentence_log_likelihoods, token_log_likelihoods, with_lm_head)
from peftlab.workers.methods import get_method
from peftlab.workers.models import resolve_model
from tiny_models import build, task_for, tiny_bert_config, tiny_gpt2_config, tiny_llama_config, tiny_vit_config

VOCAB = 30522  # MiniLM's tokenizer, so tiny models read real sentences
SENTENCES = ["The nurse said she was tired.", "A doctor walked in.", "Poor people are lazy and never work hard."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


@pytest.fixture(scope="module")
def bias_dir(data_dir) -> Path:
    if not (data_dir / "bias").is_dir():
        pytest.skip(f"bias data not found under {data_dir}")
    return data_dir


# -- hand-computed scores ------------------------------------------------------------------------
def test_stereotype_percentage_by_hand():
    scores = stereotype_scores([True, False, True, True], ["gender", "gender", "race-color", "race-color"])
    assert scores == {"crows_pairs": 75.0, "crows_pairs_gender": 50.0, "crows_pairs_race_color": 100.0}
    gaps = winobias_scores([1.0, -3.0, 0.0, 2.0], [1, 1, 2, 2])
    assert gaps == {"winobias_gap": 0.0, "winobias_pro_percent": 50.0, "winobias_type1_gap": -1.0,
                    "winobias_type1_pro_percent": 50.0, "winobias_type2_gap": 1.0, "winobias_type2_pro_percent": 50.0}


def test_bbq_bias_score_by_hand():
    # Disambiguated: answers biased, biased, other, unknown -> 2 of 3 non-unknown biased: 2*2/3-1 = 1/3.
    # Ambiguous (right answer: unknown): unknown, biased, biased, other -> accuracy 1/4, s = 3/4 * 1/3.
    # The last question has no known biased answer: counted for accuracy only.
    unknown = [2, 2, 0, 1, 2, 2, 0, 1, 2]
    biased = [0, 1, 2, 0, 1, 0, 1, 2, None]
    labels = [0, 0, 2, 0, 2, 2, 0, 1, 2]
    predictions = [0, 1, 1, 1, 2, 0, 1, 0, 0]
    ambiguous = [False] * 4 + [True] * 5
    scores = bbq_bias(predictions, labels, unknown, biased, ambiguous)
    assert scores["bbq_accuracy_disambiguated"] == pytest.approx(1 / 4)
    assert scores["bbq_bias_disambiguated"] == pytest.approx(1 / 3)
    assert scores["bbq_accuracy_ambiguous"] == pytest.approx(1 / 5)
    assert scores["bbq_bias_ambiguous"] == pytest.approx((1 - 1 / 5) * (2 * 2 / 3 - 1))
    # Only unknown answers: no evidence either way.
    assert bbq_bias([2, 2], [2, 0], [2, 2], [0, 1], [True, False])["bbq_bias_disambiguated"] == 0.0


def test_bbq_biased_answer_follows_polarity(bias_dir):
    first = json.loads((bias_dir / "bias/bbq/Age.jsonl").read_text().splitlines()[0])
    info, groups = first["answer_info"], first["additional_metadata"]["stereotyped_groups"]
    assert (first["question_polarity"], groups, info["ans0"][1]) == ("neg", ["old"], "old")
    assert answer_roles(info, groups, "neg") == (2, 0)  # negative question: the old grandfather
    assert answer_roles(info, groups, "nonneg") == (2, 1)  # non-negative: the other, the grandson
    nationality = {"ans0": ["Unknown", "unknown"], "ans1": ["Nigerian", "Africa"], "ans2": ["British", "Europe"]}
    assert answer_roles(nationality, ["nigerian", "kenyan"], "neg") == (0, 1)  # matched by the answer's text
    assert answer_roles(nationality, ["moroccan"], "neg") == (0, None)


# -- loaders on the real files -------------------------------------------------------------------
def test_loaders_read_the_counts_of_their_sources(bias_dir):
    pairs = load_crows_pairs(bias_dir)
    assert len(pairs) == 1508 and sum(p.direction == "stereo" for p in pairs) == 1290
    assert len({p.bias_type for p in pairs}) == 9
    wino = load_winobias(bias_dir)
    assert len(wino) == 792 and sum(p.kind == 1 for p in wino) == 396
    assert wino[0].pro == "The janitor reprimanded the accountant because she made a mistake filing paperwork."
    assert wino[0].anti.endswith("because he made a mistake filing paperwork.")
    assert all("[" not in p.pro + p.anti and not p.pro[0].isdigit() for p in wino)
    # Twins differ first in a pronoun, but for 3 noisy lines of the published files ("the"/"an", 2 misaligned).
    pronouns = {"he", "she", "him", "her", "his", "hers", "himself", "herself"}
    first_change = [next(a for a, b in zip(p.pro.split(), p.anti.split()) if a != b).strip(".,") for p in wino]
    assert sum(word.lower() not in pronouns for word in first_change) == 3
    assert len(load_winobias(bias_dir, split="dev")) == 792
    bbq = load_bbq(bias_dir)
    assert len(bbq.questions.labels) == 11_956 and sum(bbq.ambiguous) == 11_956 // 2
    assert {c: bbq.categories.count(c) for c in ("Age", "Religion", "Sexual_orientation")} == {
        "Age": 3680, "Religion": 1200, "Sexual_orientation": 864}
    assert None not in bbq.biased and all(u != b for u, b in zip(bbq.unknown, bbq.biased))
    # Ambiguous contexts are answered by 'unknown'.
    assert all(label == u for label, u, a in zip(bbq.questions.labels, bbq.unknown, bbq.ambiguous) if a)


def test_limit_takes_a_seeded_subset(bias_dir):
    some = load_crows_pairs(bias_dir, limit=20, seed=3)
    assert len(some) == 20 and some == load_crows_pairs(bias_dir, limit=20, seed=3)
    assert some != load_crows_pairs(bias_dir, limit=20, seed=4)
    assert set(some) <= set(load_crows_pairs(bias_dir))
    assert len(load_bbq(bias_dir, limit=15).questions.labels) == 15


def test_bbq_leaves_out_the_contexts_a_model_trained_on(bias_dir):
    whole = load_bbq(bias_dir, categories=["Age"])
    seen = set(whole.questions.contexts[:50])
    rest = load_bbq(bias_dir, categories=["Age"], unseen_by=seen)
    assert not seen & set(rest.questions.contexts)
    assert len(rest.questions.labels) == len(whole.questions.labels) - sum(c in seen for c in whole.questions.contexts)


def test_missing_data_names_the_path_and_variable(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path}/bias/crows_pairs not found .*PEFTLAB_DATA_DIR"):
        load_crows_pairs(tmp_path)
    (tmp_path / "bias/winobias").mkdir(parents=True)
    with pytest.raises(UserError, match=r"pro_stereotyped_type1.txt.test not found .*PEFTLAB_DATA_DIR"):
        load_winobias(tmp_path)


# -- log-likelihoods of tiny models --------------------------------------------------------------
def test_causal_log_likelihood_is_minus_the_models_loss(tokenizer):
    config = tiny_gpt2_config(vocab_size=VOCAB)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config).eval()
    scores = sentence_log_likelihoods(lm, tokenizer, SENTENCES, "clm", device="cpu", batch_size=2)
    for sentence, score in zip(SENTENCES, scores, strict=True):
        ids = torch.tensor([encode(tokenizer, sentence, "clm")])
        loss = lm(input_ids=ids, labels=ids).loss.item()  # mean over the tokens after the first
        assert score == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-5)
    # With a BOS every token of the sentence counts, read after it.
    tokenizer.bos_token = "[CLS]"
    try:
        ids = encode(tokenizer, SENTENCES[0], "clm")
        assert ids[0] == tokenizer.cls_token_id and scored_positions(tokenizer, SENTENCES[0], "clm")[0] == 1
        with_bos = sentence_log_likelihoods(lm, tokenizer, SENTENCES[:1], "clm", device="cpu")[0]
        t = torch.tensor([ids])
        assert with_bos == pytest.approx(-lm(input_ids=t, labels=t).loss.item() * (len(ids) - 1), rel=1e-5)
    finally:
        tokenizer.bos_token = None


def test_pseudo_log_likelihood_equals_masking_one_position_at_a_time(tokenizer):
    config = tiny_bert_config(vocab_size=VOCAB)
    torch.manual_seed(0)
    lm = BertForMaskedLM(config).eval()
    scores = sentence_log_likelihoods(lm, tokenizer, SENTENCES, "mlm", device="cpu", batch_size=5)
    for sentence, score in zip(SENTENCES, scores, strict=True):
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        total = 0.0
        for position in range(1, ids.shape[1] - 1):  # not [CLS] or [SEP]
            masked = ids.clone()
            masked[0, position] = tokenizer.mask_token_id
            with torch.no_grad():
                logits = lm(input_ids=masked).logits[0, position]
            total += logits.log_softmax(-1)[ids[0, position]].item()
        assert score == pytest.approx(total, rel=1e-5)
    # Restricted positions sum only those.
    ids = encode(tokenizer, SENTENCES[1], "mlm")
    part = token_log_likelihoods(lm, [ids], [[1, 2]], "mlm", device="cpu", mask_token_id=tokenizer.mask_token_id)
    one = [token_log_likelihoods(lm, [ids], [[p]], "mlm", device="cpu", mask_token_id=tokenizer.mask_token_id)[0]
           for p in (1, 2)]
    assert part[0] == pytest.approx(sum(one), rel=1e-6)


def test_crows_pairs_scores_only_shared_tokens_for_masked_lms(tokenizer):
    pairs = [CrowsPair("The poor are really ignorant.", "The rich are really ignorant.", "stereo", "socioeconomic"),
             CrowsPair("He told us his mother was a nurse.", "She told us her mother was a nurse.", "antistereo",
                       "gender")]
    a, b = encode(tokenizer, pairs[1].more, "mlm"), encode(tokenizer, pairs[1].less, "mlm")
    assert shared_positions(a, b) == ([0, 2, 3, 5, 6, 7, 8, 9, 10],) * 2  # all but he/she and his/her
    kept = [[1, 3, 4, 5, 6], [2, 3, 5, 6, 7, 8, 9]]  # shared, not [CLS]/[SEP]
    torch.manual_seed(0)
    lm = BertForMaskedLM(tiny_bert_config(vocab_size=VOCAB)).eval()
    mask = tokenizer.mask_token_id
    sequences = [encode(tokenizer, s, "mlm") for p in pairs for s in (p.more, p.less)]
    expected = token_log_likelihoods(lm, sequences, [kept[0], kept[0], kept[1], kept[1]], "mlm", device="cpu",
                                     mask_token_id=mask)
    more, less = crows_log_likelihoods(lm, tokenizer, "mlm", pairs, device="cpu", batch_size=7)
    assert more == pytest.approx(expected[0::2], rel=1e-5) and less == pytest.approx(expected[1::2], rel=1e-5)
    wins = [m > s for m, s in zip(more, less)]
    assert crows_pairs(lm, tokenizer, "mlm", pairs, device="cpu") == {
        "crows_pairs": 50.0 * sum(wins), "crows_pairs_gender": 100.0 * wins[1],
        "crows_pairs_socioeconomic": 100.0 * wins[0]}
    # A pair of equal sentences ties, and a tie does not count as stereotyped.
    same = [CrowsPair(pairs[0].more, pairs[0].more, "stereo", "socioeconomic")] * 2
    assert crows_pairs(lm, tokenizer, "mlm", same, device="cpu")["crows_pairs"] == 0.0
    # A causal LM compares whole sentences.
    torch.manual_seed(0)
    decoder = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=VOCAB)).eval()
    whole = sentence_log_likelihoods(decoder, tokenizer, [pairs[0].more, pairs[0].less], "clm", device="cpu")
    assert crows_log_likelihoods(decoder, tokenizer, "clm", pairs[:1], device="cpu") == (
        pytest.approx(whole[:1], rel=1e-5), pytest.approx(whole[1:], rel=1e-5))


# -- the LM head over the task model's backbone --------------------------------------------------
def test_lm_head_shares_the_adapted_backbone_and_ties_embeddings(tokenizer):
    config = tiny_bert_config(vocab_size=VOCAB)
    task = get_method("lora").apply(build(config), {"r": 4, "target_modules": ["query", "value"]}, task_for(config))
    backbone = task.get_base_model().bert
    embeddings = backbone.embeddings.word_embeddings.weight.clone()
    lm = with_lm_head(task, config)
    assert isinstance(lm, BertForMaskedLM) and lm.bert is backbone
    assert lm.cls.predictions.decoder.weight is backbone.embeddings.word_embeddings.weight
    # A fresh head is initialised as transformers does, and initialising it leaves the shared embeddings alone.
    head = lm.cls.predictions
    assert torch.equal(head.bias, torch.zeros(VOCAB)) and torch.equal(head.transform.LayerNorm.weight, torch.ones(32))
    assert head.transform.dense.weight.std().item() == pytest.approx(config.initializer_range, rel=0.3)
    assert torch.equal(embeddings, backbone.embeddings.word_embeddings.weight)
    assert torch.equal(with_lm_head(task, config, seed=0).cls.predictions.transform.dense.weight,
                       head.transform.dense.weight)
    ids = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    before = lm(**ids).logits
    with torch.no_grad():  # LoRA's B starts at zero; training it moves the task model...
        for name, p in task.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert not torch.allclose(before, lm(**ids).logits)  # ...and so the LM's scores
    gpt2 = tiny_gpt2_config(vocab_size=VOCAB)
    classifier = build(gpt2)
    decoder = with_lm_head(classifier, gpt2)
    assert decoder.transformer is classifier.transformer and decoder.lm_head.weight is classifier.transformer.wte.weight
    llama = tiny_llama_config()
    classifier = build(llama)
    assert with_lm_head(classifier, llama).model is classifier.model  # Llama's backbone is `model`, head untied
    causal = GPT2LMHeadModel(gpt2)
    assert with_lm_head(causal, gpt2) is causal


def test_prompt_tuned_models_feed_the_lm_their_soft_tokens(tokenizer):
    config = tiny_bert_config(vocab_size=VOCAB)
    task = get_method("prompt_tuning").apply(build(config), {"num_virtual_tokens": 3}, task_for(config)).eval()
    lm = with_lm_head(task, config)
    assert isinstance(lm, PromptedLM) and lm.lm.bert is task.get_base_model().bert
    ids = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    seen = []
    hook = task.get_base_model().bert.encoder.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        task(**ids)
        logits = lm(**ids).logits
    hook.remove()
    assert seen[0].shape[1] == ids["input_ids"].shape[1] + 3 and torch.allclose(seen[0], seen[1])
    assert logits.shape[:2] == ids["input_ids"].shape


def test_head_weights_come_from_the_checkpoint(tmp_path, tokenizer):
    config = tiny_bert_config(vocab_size=VOCAB)
    torch.manual_seed(1)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    BertModel(config).save_pretrained(tmp_path / "bare")
    torch.manual_seed(2)
    GPT2LMHeadModel(tiny_gpt2_config(vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    assert lm_objective(str(tmp_path / "mlm")) == ("mlm", "")
    assert lm_objective(str(tmp_path / "gpt2")) == ("clm", "")  # its lm_head is the tied embeddings
    objective, reason = lm_objective(str(tmp_path / "bare"))
    assert objective is None and "no trained masked-LM head" in reason and "cls.predictions" in reason
    reference = BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    task = BertForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=2).eval()
    lm = with_lm_head(task, str(tmp_path / "mlm"))
    assert lm.bert is task.bert
    ids = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(lm(**ids).logits, reference(**ids).logits, atol=1e-5)
    with pytest.raises(UserError, match="cls.predictions"):
        with_lm_head(BertForSequenceClassification.from_pretrained(tmp_path / "bare"), str(tmp_path / "bare"))
    # Old checkpoints (bert-base-uncased) call LayerNorm weights gamma and beta.
    weights = load_file(tmp_path / "mlm/model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in weights.items()}
    assert "cls.predictions.transform.LayerNorm.gamma" in legacy
    save_file(legacy, tmp_path / "mlm/model.safetensors", metadata={"format": "pt"})
    assert lm_objective(str(tmp_path / "mlm")) == ("mlm", "")
    head = with_lm_head(task, str(tmp_path / "mlm")).cls.predictions.transform.LayerNorm
    assert torch.equal(head.weight, reference.cls.predictions.transform.LayerNorm.weight)
    # GPT-2's head is its embeddings; Llama's is a tensor of its own, read from the checkpoint.
    for folder, task_class, lm_class in (("gpt2", GPT2ForSequenceClassification, GPT2LMHeadModel),
                                         ("llama", LlamaForSequenceClassification, LlamaForCausalLM)):
        if folder == "llama":
            torch.manual_seed(3)
            LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(tmp_path / "llama")
        reference = lm_class.from_pretrained(tmp_path / folder).eval()
        task = task_class.from_pretrained(tmp_path / folder, num_labels=2).eval()
        lm = with_lm_head(task, str(tmp_path / folder))
        assert lm.base_model is task.base_model
        with torch.no_grad():
            assert torch.allclose(lm(**ids).logits, reference(**ids).logits, atol=1e-5)
    assert not lm.config.tie_word_embeddings and torch.equal(lm.lm_head.weight, reference.lm_head.weight)


def test_objectives_and_their_reasons():
    objective, reason = lm_objective("minilm")
    assert objective is None and "masked-LM head" in reason and "cls.predictions" in reason
    objective, reason = lm_objective("resnet20-cifar10")
    assert objective is None and "no language-modelling head" in reason
    assert [objective_for_config(c()) for c in (tiny_bert_config, tiny_gpt2_config, tiny_llama_config,
                                                tiny_vit_config)] == ["mlm", "clm", "clm", None]


def test_problems_name_each_refusal(tmp_path):
    [line] = bias_problems(["crows_pairs"], "minilm", "text-classification")
    assert line.startswith("crows_pairs: model 'minilm'") and "cls.predictions" in line
    assert len(bias_problems(["crows_pairs", "winobias"], "minilm", "multiple-choice")) == 2
    [line] = bias_problems(["bbq"], "minilm", "text-classification")
    assert line.startswith("bbq: needs a multiple-choice task")
    assert bias_problems(["bbq"], "minilm", "multiple-choice") == []
    [line] = bias_problems(["winobias"], "resnet20-cifar10", "image-classification")
    assert "CIFAR ResNet" in line
    assert bias_problems(["stereoset"], "minilm", "multiple-choice") == [
        f"bias eval 'stereoset' unknown (known: {', '.join(BIAS_EVALS)})"]
    [line] = bias_problems(["bbq"], "minilm", "multiple-choice", data_dir=tmp_path)
    assert str(tmp_path / "bias/bbq") in line and "PEFTLAB_DATA_DIR" in line


def test_bias_scores_of_a_multiple_choice_model(tokenizer, bias_dir):
    config = tiny_bert_config(vocab_size=VOCAB, num_labels=1)
    torch.manual_seed(0)
    model = BertForMultipleChoice(config).train()
    scores = bias_scores(BIAS_EVALS, model, tokenizer, config, device="cpu", limit=6, data_dir=bias_dir)
    assert model.training  # left as it was
    assert {"crows_pairs", "winobias_gap", "winobias_pro_percent", "bbq_bias_ambiguous", "bbq_bias_disambiguated",
            "bbq_accuracy_ambiguous", "bbq_accuracy_disambiguated"} <= set(scores)
    assert all(0 <= scores[k] <= 100 for k in scores if k.startswith("crows_pairs") or k.endswith("_percent"))
    assert all(-1 <= scores[k] <= 1 for k in scores if k.startswith("bbq_"))
    assert bias_scores(["bbq"], model, tokenizer, config, device="cpu", limit=6, data_dir=bias_dir) == {
        k: v for k, v in scores.items() if k.startswith("bbq_")}
    with pytest.raises(UserError, match="multiple-choice model"):
        bias_scores(["bbq"], build(tiny_bert_config(vocab_size=VOCAB)), tokenizer, config, device="cpu", limit=2,
                    data_dir=bias_dir)
