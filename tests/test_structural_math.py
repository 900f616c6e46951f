"""The structural methods against their formulas (METHODS.md), with dense matrices built here:
ETHER's reflections, ETHER+'s relaxed two-sided form, peft's BAT and Bone layouts, adapter sizes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from peftlab.workers.methods import TaskInfo, get_method
from peftlab.workers.methods.adapters import Bottleneck
from peftlab.workers.methods.ether import EtherLinear, EtherPlusLinear
from tiny_models import ALL_CONFIGS, CONFIGS, build, build_meta, task_for


def householder(u: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(u), dtype=u.dtype) - 2 * torch.outer(u, u) / (u @ u)


def relaxed(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.eye(len(u), dtype=u.dtype) - torch.outer(u, u) / (u @ u) + torch.outer(v, v) / (v @ v)


def blockdiag(blocks: list[torch.Tensor]) -> torch.Tensor:
    return torch.block_diag(*blocks)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- ETHER ----------------------------------------------------------------------------------------------
def test_ether_blocks_are_reflections_and_the_layer_is_w_times_blockdiag():
    base = nn.Linear(12, 7).double()
    layer = EtherLinear(base, {"n_blocks": 3})
    u = layer.ether_u.detach()
    assert u.shape == (3, 4)
    eye = torch.eye(4, dtype=torch.float64)
    for h in map(householder, u):
        torch.testing.assert_close(torch.linalg.matrix_norm(h - eye), torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(h @ h.T, eye)  # orthogonal
        torch.testing.assert_close(torch.linalg.det(h), torch.tensor(-1.0, dtype=torch.float64))
    dense = base.weight @ blockdiag([householder(b) for b in u])
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.adapted_weight(), dense)
    torch.testing.assert_close(layer(x), F.linear(x, dense, base.bias))
    # a reflection keeps the norm of every block of x
    xb, hb = x.unflatten(-1, (3, 4)), (x @ blockdiag([householder(b) for b in u])).unflatten(-1, (3, 4))
    torch.testing.assert_close(xb.norm(dim=-1), hb.norm(dim=-1))


def test_ether_is_not_the_identity_for_any_u():
    layer = EtherLinear(nn.Linear(8, 8), {"n_blocks": 2})
    for _ in range(3):
        with torch.no_grad():
            layer.ether_u.normal_()
        eye = torch.eye(8)
        dense = blockdiag([householder(b) for b in layer.ether_u.detach()])
        torch.testing.assert_close(torch.linalg.matrix_norm(dense - eye) ** 2, torch.tensor(2 * 2.0**2))


def test_ether_n_blocks_must_divide_d_in():
    config = CONFIGS["bert"]()  # hidden 32, FFN 37
    model, task = build_meta(config), task_for(config)
    assert get_method("ether").check_applicable(model, {"n_blocks": 8}, task) == []
    problems = get_method("ether").check_applicable(model, {"n_blocks": 8, "target_modules": "all-linear"}, task)
    assert len(problems) == 1
    assert "n_blocks=8 must divide d_in" in problems[0] and "37 -> 32" in problems[0] and "32 -> 37" not in problems[0]
    problems = get_method("ether_plus").check_applicable(
        model, {"n_blocks": 8, "sides": 2, "target_modules": ["intermediate.dense"]}, task)
    assert "must divide d_in and d_out" in problems[0] and "32 -> 37" in problems[0]


# -- ETHER+ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sides", [1, 2])
def test_ether_plus_is_the_identity_at_init(sides):
    base = nn.Linear(12, 8)
    layer = EtherPlusLinear(base, {"n_blocks": 4, "sides": sides})
    x = torch.randn(3, 12)
    if sides == 1:
        assert torch.equal(layer(x), base(x))  # exact: v = -u cancels before x is added
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)  # sides 2 adds the bias separately
    torch.testing.assert_close(layer.adapted_weight(), base.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sides", [1, 2])
def test_ether_plus_matches_dense_h_out_w_h_in(sides):
    base = nn.Linear(12, 8).double()
    layer = EtherPlusLinear(base, {"n_blocks": 2, "sides": sides})
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    h_in = blockdiag([relaxed(u, v) for u, v in zip(layer.ether_u_in.detach(), layer.ether_v_in.detach())])
    dense = base.weight @ h_in
    if sides == 2:
        h_out = blockdiag([relaxed(u, v) for u, v in zip(layer.ether_u_out.detach(), layer.ether_v_out.detach())])
        dense = h_out @ dense
        assert not torch.allclose(h_out @ h_out.T, torch.eye(8, dtype=torch.float64))  # not orthogonal once trained
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(layer.adapted_weight(), dense)
    torch.testing.assert_close(layer(x), F.linear(x, dense, base.bias))  # the bias is not transformed
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == EtherPlusLinear.count(
        12, 8, {"sides": sides})


# -- Bone / BAT (peft's MiSS) ----------------------------------------------------------------------------
def _miss_layer(method: str, block: int, target: str):
    """RoBERTa's first FFN layer, 24 -> 50 or 50 -> 24 (not square), under our method, with random B."""
    config = CONFIGS["roberta"]()
    model = get_method(method).apply(build(config), {"block_size": block, "target_modules": [target]},
                                     task_for(config))
    layer = model.base_model.model.roberta.encoder.layer[0].get_submodule(target)
    with torch.no_grad():
        layer.miss_block["default"].normal_()
    return layer, layer.get_base_layer().weight.detach().clone(), layer.miss_block["default"].detach()


def test_bat_is_w_ac_b_a_plus_b_a_per_output_row_block():
    b = 2
    layer, w, blocks = _miss_layer("bone", b, "intermediate.dense")  # W: 50 x 24
    assert blocks.shape == (50 // b, b, b)  # one b x b matrix per output-row block, b * d_out params
    expected = w.clone()
    for a in range(50 // b):
        rows = slice(a * b, (a + 1) * b)
        for c in range(24 // b):
            cols = slice(c * b, (c + 1) * b)
            expected[rows, cols] += w[rows, cols] @ blocks[a] + blocks[a]
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.get_base_layer().bias))
    torch.testing.assert_close(w + layer.get_delta_weight("default", w), expected)


def test_bone_simple_adds_b_transposed_to_every_input_block():
    b = 2
    layer, w, block = _miss_layer("bone_simple", b, "output.dense")  # W: 24 x 50
    assert block.shape == (b, 24)
    expected = w + block.T.repeat(1, 50 // b)  # [B^T, B^T, ...]
    x = torch.randn(3, 50)
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.get_base_layer().bias))


def test_bone_block_size_must_divide_the_layers():
    config = CONFIGS["bert"]()  # hidden 32, FFN 37
    model, task = build_meta(config), task_for(config)
    problems = get_method("bone").check_applicable(model, {"block_size": 8, "target_modules": ["dense"]}, task)
    assert len(problems) == 1 and "block_size=8 must divide d_in and d_out" in problems[0]
    assert "32 -> 37" in problems[0] and "37 -> 32" in problems[0]
    assert get_method("bone_simple").check_applicable(
        model, {"block_size": 8, "target_modules": ["intermediate.dense"]}, task) == []  # only b | d_in
    assert "must divide d_in of" in get_method("bone_simple").check_applicable(
        model, {"block_size": 8, "target_modules": ["output.dense"]}, task)[0]


def test_bone_size_for_budget_picks_a_fitting_block_size():
    config = CONFIGS["roberta"]()  # query, value: 24 -> 24
    model, task, bone = build_meta(config), task_for(config), get_method("bone")
    head = bone.expected_trainable(model, {"block_size": 1}, task) - 2 * 24
    hp = bone.size_for_budget(model, {}, task, head + 2 * 24 * 5)  # 5 does not divide 24; 4 and 6 do, tie -> 4
    assert hp["block_size"] == 4
    assert bone.size_for_budget(model, {}, task, head + 2 * 24 * 7)["block_size"] == 6


# -- adapters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, m", [(32, 4), (24, 64), (384, 64)])
def test_bottleneck_sizes_and_its_two_inits(d, m):
    houlsby = Bottleneck(d, m, "gelu", torch.empty(1), init_std=1e-3)
    assert sum(p.numel() for p in houlsby.parameters()) == Bottleneck.count(d, m) == 2 * m * d + m + d
    for weight in (houlsby.down.weight, houlsby.up.weight):  # adapter-bert: truncated normal, std 1e-3, both
        assert weight.abs().max() <= 2e-3 and 0.5e-3 < weight.std() < 1e-3
    assert not houlsby.down.bias.any() and not houlsby.up.bias.any()
    parallel = Bottleneck(d, m, "relu", torch.empty(1), init_std=None, dropout=0.1)
    assert torch.equal(parallel(torch.randn(2, d)), torch.zeros(2, d)) and parallel.down.weight.std() > 0


def _trained(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.normal_(std=0.1)


def _bottleneck(a: Bottleneck, h: torch.Tensor, act=lambda x: F.gelu(x, approximate="tanh")) -> torch.Tensor:
    return a.up(act(a.down(h)))


def test_houlsby_on_bert_is_dense_dropout_adapter_then_layernorm():
    """adapter-bert's placement: LayerNorm(h + adapter(h) + residual), h = dropout(dense(x))."""
    config = CONFIGS["bert"]()
    model = get_method("houlsby").apply(build(config), {"bottleneck": 4}, task_for(config))
    layer = model.bert.encoder.layer[0]
    _trained(model)
    for block in (layer.attention.output, layer.output):
        a = block.dropout.adapter
        x, residual = torch.randn(2, 5, block.dense.in_features), torch.randn(2, 5, 32)
        h = block.dense(x)
        torch.testing.assert_close(block(x, residual), block.LayerNorm(h + _bottleneck(a, h) + residual))
    assert model.bert.embeddings.LayerNorm.weight.requires_grad  # adapter-bert trains every LayerNorm


def test_houlsby_on_a_llama_block_adapts_both_sub_layer_outputs_before_the_residual():
    config = ALL_CONFIGS["llama"]()
    model = get_method("houlsby").apply(build(config), {"bottleneck": 4}, task_for(config))
    layer = model.model.layers[0]
    _trained(model)
    mlp, x = layer.mlp, torch.randn(2, 5, 32)
    h = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), h + _bottleneck(mlp.adapter, h))
    assert isinstance(layer.self_attn.adapter, Bottleneck)
    assert layer.input_layernorm.weight.requires_grad and model.model.norm.weight.requires_grad


def test_adaptformer_adds_a_scaled_parallel_branch_to_the_ffn():
    config = CONFIGS["roberta"]()
    model = get_method("adaptformer").apply(build(config), {"bottleneck": 4, "scale": 0.5}, task_for(config))
    layer = model.roberta.encoder.layer[0].eval()
    _trained(model)
    h = torch.randn(2, 5, 24)  # the FFN input (the normalised attention output)
    a = layer.output.dropout.adapter
    ffn = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h)))
    expected = layer.output.LayerNorm(ffn + 0.5 * _bottleneck(a, h, F.relu) + h)
    torch.testing.assert_close(layer.feed_forward_chunk(h), expected)


def test_adaptformer_on_a_vit_reads_the_stream_before_the_norm():
    """Pre-LN, as in the reference: x + MLP(LN(x)) + s * adapter(x); the branch's dropout acts in training."""
    config = ALL_CONFIGS["vit"]()
    model = get_method("adaptformer").apply(build(config), {"bottleneck": 4}, task_for(config))
    layer = model.vit.layers[0].eval()
    _trained(model)
    x, mlp = torch.randn(2, 5, 32), layer.mlp
    a = mlp.adapter
    plain = mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layernorm_after(x))))
    torch.testing.assert_close(mlp(layer.layernorm_after(x)), plain + 0.1 * _bottleneck(a, x, F.relu))
    a.train()
    assert not torch.allclose(a(x), a(x))  # dropout 0.1 inside the branch


def test_adapters_need_an_architecture_in_the_table():
    class NotBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(4, 4), nn.Linear(4, 2)

    task = TaskInfo("text-classification", 2, ("classifier",))
    for name in ("houlsby", "adaptformer"):
        problems = get_method(name).check_applicable(NotBert(), {}, task)
        assert len(problems) == 1 and "the architecture table has no entry for NotBert" in problems[0]
        assert "gpt2" in problems[0] and "lora" in problems[0]
