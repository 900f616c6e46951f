"""One contract table run through the same checks for every registered method (METHODS.md, "Verification").
A method missing from the table fails the suite; peft-backed rows name the plain peft config they must equal."""
from __future__ import annotations

import itertools

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from peftlab.errors import UserError
from peftlab.workers.methods import Calibration, HParam, Method, TaskInfo, all_methods, get_method, register
from method_table import Case, all_cases, head
from tiny_models import ALL_CONFIGS, CONFIGS, batch, build, build_meta, head_names, task_for

CASES = all_cases()
PARAMS = [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in c.shapes]


def test_every_registered_method_is_in_the_table():
    assert {c.method for c in CASES} == set(all_methods())


# -- helpers -----------------------------------------------------------------------------------------
def adapted(case: Case, shape: str, calibrate: bool = True) -> tuple[Method, nn.Module, object, TaskInfo]:
    """The method applied to a fresh tiny model, and calibrated on training batches where it needs them."""
    config = ALL_CONFIGS[shape]()
    method, task = get_method(case.method), task_for(config)
    model = method.apply(build(config), case.hparams, task)
    if method.calibrates and calibrate:
        method.calibrate(model, case.calibration(config) if case.calibration else
                         Calibration(batches=(batch(config, seed=100 + i) for i in itertools.count())))
    return method, model, config, task


def logits(model: nn.Module, config) -> torch.Tensor:
    inputs = {k: v for k, v in batch(config).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def train(model: nn.Module, config, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        model(**batch(config, seed=step)).loss.backward()
        opt.step()
    model.eval()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# -- the contract --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, shape", PARAMS)
def test_trainable_count_matches_formula(case, shape):
    method, model, config, task = adapted(case, shape)
    counted = sum(p.numel() for p in trainable(model).values())
    hand = case.expected(build(config))
    assert counted == hand
    assert method.expected_trainable(build_meta(config), case.hparams, task) == hand  # shapes only, no weights


@pytest.mark.parametrize("case, shape", PARAMS)
def test_identity_at_init(case, shape):
    # As apply leaves it: a first training stage (calibrate) moves a method's model on purpose.
    method, model, config, _ = adapted(case, shape, calibrate=False)
    frozen = logits(build(config), config)
    if method.identity_at_init:
        torch.testing.assert_close(logits(model, config), frozen, atol=1e-5, rtol=0)
    elif method.near_identity_at_init:
        torch.testing.assert_close(logits(model, config), frozen, atol=1e-3, rtol=0)
        assert not torch.equal(logits(model, config), frozen)
    else:  # the flag must be honest both ways
        assert not torch.allclose(logits(model, config), frozen, atol=1e-5)


@pytest.mark.parametrize("case, shape", PARAMS)
def test_merge_reproduces_adapted_model(case, shape):
    method, model, config, _ = adapted(case, shape)
    if not method.mergeable:
        with pytest.raises(NotImplementedError):
            method.merge(model)
        return
    before = logits(model, config)
    train(model, config, steps=5)
    after = logits(model, config)
    assert not torch.allclose(after, before)
    merged = method.merge(model)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, config), after, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case, shape", PARAMS)
def test_only_method_parameters_get_gradients(case, shape):
    _, model, config, task = adapted(case, shape)
    model.train()
    model(**batch(config)).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(trainable(model))
    assert all(case.owns(n.removeprefix("base_model.model.").removeprefix("base_model.")) for n in grads)
    assert any(h in n for n in grads for h in head_names(config)), "the head must train"


@pytest.mark.parametrize("case, shape", PARAMS)
def test_save_and_load_into_fresh_base(case, shape, tmp_path):
    method, model, config, _ = adapted(case, shape)
    train(model, config, steps=3)
    expected = logits(model, config)
    method.save(model, tmp_path)
    loaded = method.load(build(config), tmp_path)
    assert not trainable(loaded)
    torch.testing.assert_close(logits(loaded, config), expected, atol=1e-6, rtol=0)
    if case.peft is not None:
        plain = PeftModel.from_pretrained(build(config), str(tmp_path))
        torch.testing.assert_close(logits(plain, config), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case, shape", [p for p in PARAMS if p.values[0].peft is not None])
def test_equals_plain_peft(case, shape):
    _, ours, config, _ = adapted(case, shape)
    train(ours, config, steps=3)
    plain = get_peft_model(build(config), case.peft())
    assert {n: p.shape for n, p in trainable(plain).items()} == {n: p.shape for n, p in trainable(ours).items()}
    plain.load_state_dict(ours.state_dict())  # strict: same modules, same buffers
    torch.testing.assert_close(logits(plain, config), logits(ours, config), atol=1e-6, rtol=0)


# -- hyperparameters, applicability, sizing, registry ---------------------------------------------------
def test_resolve_fills_defaults_and_rejects_unknown():
    lora = get_method("lora")
    hp = lora.resolve({"r": 4})
    assert hp == {"r": 4, "alpha": 16, "dropout": 0.05, "target_modules": None, "use_rslora": False,
                  "init": "default", "lr": 5e-4, "weight_decay": 0.0}
    with pytest.raises(UserError, match="unknown hyperparameter 'rank'.*known: r, alpha"):
        lora.resolve({"rank": 4})
    with pytest.raises(UserError) as err:  # every problem in one error
        lora.resolve({"r": 0, "dropout": 2.0})
    assert "r: 0" in str(err.value) and "dropout: 2.0" in str(err.value)
    assert get_method("bitfit").resolve({}) == {"lr": 1e-3, "weight_decay": 0.0}


@pytest.mark.parametrize("param, value, problem", [
    (HParam("r", int, 8, "", low=1), "8", "expected an int"),
    (HParam("r", int, 8, "", low=1), 8.0, "expected an int"),
    (HParam("r", int, 8, "", low=1), True, "expected an int"),
    (HParam("r", int, 8, "", low=1), 0, "below"),
    (HParam("p", float, 0.1, "", low=0.0, high=1.0), 1.5, "above"),
    (HParam("p", float, 0.1, "", low=0.0, high=1.0), "x", "expected a number"),
    (HParam("lr", float, 1e-3, "", low=0.0, open_low=True), 0.0, "below"),
    (HParam("b", bool, False, ""), 1, "expected true or false"),
    (HParam("s", str, "a", "", choices=("a", "b")), "c", "not one of"),
    (HParam("t", list, ["q"], "", choices=("all-linear",)), "query", "list of names"),
    (HParam("t", list, ["q"], "", choices=("all-linear",)), [], "list of names"),
    (HParam("t", list, ["q"], "", choices=("all-linear",)), [1], "list of names"),
])
def test_hparam_check_catches_bad_values(param, value, problem):
    assert problem in param.check(value)


@pytest.mark.parametrize("param, value", [
    (HParam("p", float, 0.1, "", low=0.0, high=1.0), 1),
    (HParam("p", float, 0.1, "", low=0.0, high=1.0), 1.0),
    (HParam("t", list, ["q"], "", choices=("all-linear",)), "all-linear"),
    (HParam("t", list, None, ""), None),
])
def test_hparam_check_accepts_good_values(param, value):
    assert param.check(value) is None


def test_check_applicable_names_missing_target_module():
    model, task = build_meta(CONFIGS["bert"]()), task_for(CONFIGS["bert"]())
    problems = get_method("lora").check_applicable(model, {"target_modules": ["query", "q_proj"]}, task)
    assert len(problems) == 1 and "'q_proj' not found" in problems[0] and "query" in problems[0]
    problems = get_method("ia3").check_applicable(model, {"target_modules": ["attention"]}, task)
    assert "ia3 adapts Linear or Conv1D layers" in problems[0]
    problems = get_method("bitfit").check_applicable(model, {}, TaskInfo("text-classification", 3, ("score",)))
    assert "'score'" in problems[0]
    with pytest.raises(UserError, match="q_proj"):
        get_method("dora").apply(build(CONFIGS["bert"]()), {"target_modules": ["q_proj"]}, task)
    # A misspelt target names the nearest real ones, for peft's methods and the wrapping ones alike.
    for name in ("lora", "ether"):
        (problem,) = get_method(name).check_applicable(model, {"target_modules": ["qeury"]}, task)
        assert "'qeury' not found" in problem and "nearest: query" in problem, problem


def test_architecture_refusals_say_why_in_one_line():
    gpt2 = ALL_CONFIGS["gpt2"]()
    model, task = build_meta(gpt2), task_for(gpt2)
    (problem,) = get_method("bone").check_applicable(model, {}, task)  # peft's MiSS has no Conv1D layer
    assert "c_attn" in problem and "Conv1D" in problem and "bone adapts Linear layers" in problem

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)

    plain = TaskInfo("text-classification", 2, ("classifier",))
    for name in ("ether", "bora", "lora", "oft"):
        (problem,) = get_method(name).check_applicable(Unknown(), {}, plain)
        assert f"method {name} has no default target_modules for Unknown" in problem
        assert "set target_modules" in problem and "llama" in problem
    assert get_method("ether").check_applicable(Unknown(), {"target_modules": ["proj"], "n_blocks": 1}, plain) == []


def test_defaults_apply_to_minilm():
    """MiniLM is a BERT (query/key/value/dense): every method's defaults fit it as they are."""
    from peftlab.workers.models import meta_classifier

    model, task = meta_classifier("minilm", 2), TaskInfo("text-classification", 2, ("classifier",))
    for method in all_methods().values():
        if method.needs <= task.offers:
            assert method.check_applicable(model, {}, task) == [], method.name
        else:  # made for what text classification lacks (VPT: image patch tokens): refused up front
            (problem,) = method.check_applicable(model, {}, task)
            assert problem.startswith(f"method {method.name} needs "), problem
    # 6 layers x (query, value) x 8 x (384 + 384), plus a 384 x 2 head.
    assert get_method("lora").expected_trainable(model, {}, task) == 6 * 2 * 8 * 768 + 384 * 2 + 2


def test_size_for_budget_picks_closest_size():
    config = CONFIGS["bert"]()
    model, task, lora = build_meta(config), task_for(config), get_method("lora")

    def count(r: int) -> int:
        return lora.expected_trainable(model, {"r": r}, task)

    for budget in (1, count(5), count(5) + 10, (count(6) + count(7)) // 2 + 1, 10**9):
        r = lora.size_for_budget(model, {"alpha": 32}, task, budget)["r"]
        assert abs(count(r) - budget) <= min(abs(count(v) - budget) for v in range(1, 200)), budget
    hp = lora.size_for_budget(model, {"alpha": 32}, task, count(5))
    assert hp["r"] == 5 and hp["alpha"] == 32 and hp["lr"] == lora.default_lr
    prompt = get_method("prompt_tuning")
    assert prompt.size_for_budget(model, {}, task, head(model) + 7 * 32)["num_virtual_tokens"] == 7
    with pytest.raises(UserError, match="method bitfit has no size hyperparameter"):
        get_method("bitfit").size_for_budget(model, {}, task, 1000)


@pytest.mark.parametrize("name", [n for n, m in all_methods().items() if any(h.size for h in m.hparams)])
def test_size_for_budget_returns_a_size_the_model_takes(name):
    method = get_method(name)
    config = (CONFIGS["bert"] if method.needs <= task_for(CONFIGS["bert"]()).offers else ALL_CONFIGS["vit"])()
    model, task = build_meta(config), task_for(config)
    for budget in (1, 10**4, 10**9):  # far below, near and far above what the tiny model allows
        hp = method.size_for_budget(model, {}, task, budget)
        assert method.check_applicable(model, hp, task) == [], (budget, hp)


def test_prompt_tuning_text_init_uses_the_tokenizer():
    from transformers import AutoTokenizer

    from peftlab.workers.models import resolve_model

    minilm = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = CONFIGS["bert"](vocab_size=tokenizer.vocab_size)
    hp = {"num_virtual_tokens": 5, "init": "text", "init_text": "great movie", "tokenizer": minilm}
    method = get_method("prompt_tuning")
    problems = method.check_applicable(build_meta(config), {**hp, "init_text": ""}, task_for(config))
    assert "non-empty init_text" in problems[0]
    model = method.apply(build(config), hp, task_for(config))
    ids = tokenizer("great movie")["input_ids"]  # peft keeps the special tokens: [CLS] great movie [SEP]
    assert len(ids) == 4
    expected = model.get_input_embeddings().weight[torch.tensor(ids + ids[:1])]  # repeated to length
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected)


def test_vpt_refusals_say_why_in_one_line():
    bert = CONFIGS["bert"]()
    vpt = get_method("vpt")
    (problem,) = vpt.check_applicable(build_meta(bert), {}, task_for(bert))  # text classification
    assert problem.startswith("method vpt needs a sequence of image patch tokens, which text-classification tasks "
                              "do not offer; methods that run there: ") and "\n" not in problem
    works = problem.rsplit(": ", 1)[1].split(", ")
    assert {"lora", "prompt_tuning", "houlsby"} <= set(works) and "vpt" not in works
    with pytest.raises(UserError, match="method vpt needs a sequence of image patch tokens"):
        vpt.apply(build(bert), {}, task_for(bert))
    # Image classification offers patch tokens, but a CNN (or any non-ViT) has none.
    from peftlab.workers.models import LogitsClassifier
    from peftlab.workers.vision.resnet_cifar import ResNetCifar

    with torch.device("meta"):
        resnet = LogitsClassifier(ResNetCifar(20, 2))
    (problem,) = vpt.check_applicable(resnet, {}, TaskInfo("image-classification", 2, ("net.linear",)))
    assert "after the CLS token of a ViT" in problem and "LogitsClassifier" in problem


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_is_the_reference_forward(deep):
    """KMnP/vpt's forward, written out on the frozen ViT: [CLS, prompts, patches] after the embeddings,
    and (deep) layer i > 0 reading its own prompts in place of positions 1..p."""
    config, p = ALL_CONFIGS["vit"](), 3
    model = get_method("vpt").apply(build(config), {"num_tokens": p, "deep": deep}, task_for(config))
    train(model, config, steps=2)
    fan_in, d = config.num_channels * config.patch_size**2, config.hidden_size
    deep_prompts = [layer.vpt_prompt.tokens for layer in model.vit.layers[1:]] if deep else []
    prompts = [model.vit.embeddings.vpt_prompt.tokens, *deep_prompts]
    assert len(prompts) == (config.num_hidden_layers if deep else 1)
    untrained = get_method("vpt").apply(build(config), {"num_tokens": p, "deep": deep}, task_for(config))
    bound = (6 / (fan_in + d)) ** 0.5  # the reference's sqrt(6 / (3 * patch area + d))
    assert 0.5 * bound < untrained.vit.embeddings.vpt_prompt.tokens.abs().max() <= bound

    base, pixels = build(config), batch(config)["pixel_values"]
    with torch.no_grad():
        h = base.vit.embeddings(pixels)
        n = len(pixels)
        h = torch.cat((h[:, :1], prompts[0].expand(n, -1, -1), h[:, 1:]), dim=1)
        for i, layer in enumerate(base.vit.layers):
            if deep and i > 0:
                h = torch.cat((h[:, :1], prompts[i].expand(n, -1, -1), h[:, 1 + p:]), dim=1)
            h = layer(h)
        expected = model.classifier(base.vit.layernorm(h)[:, 0])  # the head trained too
    assert h.shape[1] == 1 + p + (config.image_size // config.patch_size) ** 2
    torch.testing.assert_close(logits(model, config), expected, atol=1e-6, rtol=0)


def test_registry_refuses_unknown_and_duplicate_names():
    known = ", ".join(sorted(all_methods()))
    with pytest.raises(UserError, match=f"unknown method 'nope'; known: {known}"):
        get_method("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Again", (type(get_method("lora")),), {}))
