import copy

import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import count_parameters, find_layers
from lmshrink.pruning import prune_model
from lmshrink.pruning.storage import load_pruned, save_pruned
from lmshrink.pruning.structured import block_shape, global_plan, remove_heads, remove_layers, remove_neurons


def _calib(n=4, seq=24, seed=0, bert=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (1, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)} if bert else {"input_ids": ids})
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_removing_head_groups_equals_zeroing_their_output(tiny_llama):
    ids = torch.randint(0, 128, (2, 20))
    ref_model = copy.deepcopy(tiny_llama)
    hd = 16  # hidden 64 / 4 heads; group 1 of layer 0 = query heads 2,3 (columns 32..63 of o_proj)
    with torch.no_grad():
        ref_model.model.layers[0].self_attn.o_proj.weight[:, 2 * hd :] = 0
    remove_heads(tiny_llama, {0: [1]})
    assert block_shape(tiny_llama.model.layers[0]) == {"heads": 2, "kv_heads": 1, "intermediate": 128}
    assert tiny_llama.model.layers[0].self_attn.k_proj.out_features == hd
    torch.testing.assert_close(_logits(tiny_llama, ids), _logits(ref_model, ids), rtol=1e-5, atol=1e-5)


def test_removing_neurons_equals_zeroing_them(tiny_llama):
    ids = torch.randint(0, 128, (2, 20))
    ref_model = copy.deepcopy(tiny_llama)
    drop = [0, 5, 77, 127]
    with torch.no_grad():
        ref_model.model.layers[1].mlp.down_proj.weight[:, drop] = 0
    remove_neurons(tiny_llama, {1: drop})
    assert tiny_llama.model.layers[1].mlp.gate_proj.out_features == 124
    torch.testing.assert_close(_logits(tiny_llama, ids), _logits(ref_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,sparsity", [("heads", 0.5), ("neurons", 0.3), ("layers", 0.5)])
def test_structured_llama_runs_shrinks_and_roundtrips(tiny_llama, tmp_path, method, sparsity):
    before = count_parameters(tiny_llama)
    report = prune_model(tiny_llama, {"method": method, "sparsity": sparsity}, _calib(), progress=False)
    assert report.parameters_after == count_parameters(tiny_llama) < before
    assert tiny_llama.lmshrink_format == "pruned"
    ids = torch.randint(0, 128, (1, 12))
    logits = _logits(tiny_llama, ids)
    assert torch.isfinite(logits).all()
    # decoding with a KV cache works on the irregular shapes
    out = tiny_llama.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    with torch.no_grad():
        past = tiny_llama(input_ids=out[:, :-1], use_cache=True).past_key_values
        step = tiny_llama(input_ids=out[:, -1:], past_key_values=past).logits[:, -1]
    torch.testing.assert_close(step, _logits(tiny_llama, out)[:, -1], rtol=1e-4, atol=1e-4)
    manifest = save_pruned(tiny_llama, tmp_path, None)
    manifest["format"] = "pruned"
    loaded, _ = load_pruned(tmp_path, manifest)
    assert count_parameters(loaded) == count_parameters(tiny_llama)
    torch.testing.assert_close(_logits(loaded, ids), logits, rtol=0, atol=0)


def test_heads_respect_gqa_groups(tiny_llama):
    prune_model(tiny_llama, {"method": "heads", "sparsity": 0.5}, _calib(), progress=False)
    shapes = tiny_llama.config.lmshrink_layer_shapes
    # 2 of the 4 KV groups go; each layer keeps >= 1 group with its 2 query heads
    assert sum(s["kv_heads"] for s in shapes) == 2
    assert all(s["heads"] == 2 * s["kv_heads"] for s in shapes)


def test_layers_renumbered(tiny_llama):
    remove_layers(tiny_llama, [0])
    assert tiny_llama.config.num_hidden_layers == 1
    assert tiny_llama.model.layers[0].self_attn.layer_idx == 0
    assert tiny_llama.config.lmshrink_removed_layers == [0]


@pytest.mark.parametrize("method,sparsity", [("heads", 0.5), ("neurons", 0.4), ("layers", 0.5)])
def test_structured_bert(tiny_bert, tmp_path, method, sparsity):
    before = count_parameters(tiny_bert)
    prune_model(tiny_bert, {"method": method, "sparsity": sparsity}, _calib(bert=True), progress=False)
    assert count_parameters(tiny_bert) < before
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = tiny_bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (2, 2)
    manifest = save_pruned(tiny_bert, tmp_path, None)
    loaded, _ = load_pruned(tmp_path, manifest)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_bert_heads_are_single_heads(tiny_bert):
    remove_heads(tiny_bert, {0: [0, 2, 3]})
    attn = tiny_bert.bert.encoder.layer[0].attention.self
    assert attn.query.out_features == 16 and attn.num_attention_heads == 1


def test_plans_that_remove_everything_are_errors(tiny_llama):
    with pytest.raises(LmshrinkError, match="every attention head"):
        remove_heads(tiny_llama, {0: [0, 1]})
    with pytest.raises(LmshrinkError, match="every layer"):
        remove_layers(tiny_llama, [0, 1])
    with pytest.raises(LmshrinkError, match="every MLP neuron"):
        remove_neurons(tiny_llama, {0: list(range(128))})
    with pytest.raises(LmshrinkError, match="all 2 layers"):
        prune_model(tiny_llama, {"method": "layers", "sparsity": 0.8}, _calib(), progress=False)
    with pytest.raises(LmshrinkError, match="keep at least"):
        prune_model(tiny_llama, {"method": "heads", "sparsity": 0.9}, _calib(), progress=False)
    with pytest.raises(LmshrinkError, match="does not exist"):
        remove_heads(tiny_llama, {5: [0]})
    # nothing was changed by the failed calls
    assert len(find_layers(tiny_llama)[1]) == 2


def test_global_plan_keeps_floor():
    scores = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])]
    plan = global_plan(scores, 0.5, min_keep=0.25)
    assert plan == {0: [0, 1, 2], 1: [0]}


# ----------------------------------------------------------------------------------------------- reconstruction


def _output_error(model, reference, batches):
    with torch.no_grad():
        return sum(float((model(**b).logits - reference(**b).logits).pow(2).mean()) for b in batches) / len(
            batches
        )


def test_refit_input_columns_is_the_least_squares_fit():
    from lmshrink.pruning.structured import InputGram, refit_input_columns

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=True)
    x = torch.randn(512, 6) @ torch.randn(6, 16) + 0.05 * torch.randn(
        512, 16
    )  # rank ~6: kept columns predict the rest
    gram = InputGram(16)
    gram.add(x[:256])
    gram.add(x[256:])
    keep = torch.arange(0, 16, 2)
    target = lin(x)
    plain = x[:, keep] @ lin.weight[:, keep].T + lin.bias
    fit = refit_input_columns(lin, keep, gram, damp=0.0)
    assert (fit.in_features, fit.out_features) == (8, 8)
    err_fit = float((fit(x[:, keep]) - target).pow(2).mean())
    assert err_fit < 0.05 * float((plain - target).pow(2).mean())
    # the same as an explicit least-squares solve with an intercept
    design = torch.cat([x[:, keep], torch.ones(512, 1)], 1).double()
    sol = torch.linalg.lstsq(design, target.detach().double()).solution.T
    torch.testing.assert_close(fit.weight.detach().double(), sol[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fit.bias.detach().double(), sol[:, -1], rtol=1e-4, atol=1e-4)
    # huge damping = plain removal
    far = refit_input_columns(lin, keep, gram, damp=1e9)
    torch.testing.assert_close(far.weight, lin.weight[:, keep], rtol=1e-5, atol=1e-5)


def _projection_outputs(model, path, batches):
    outs = []
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _a, out: outs.append(out.detach()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        handle.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])


@pytest.mark.parametrize("method,path", [("heads", "self_attn.o_proj"), ("neurons", "mlp.down_proj")])
def test_reconstruct_fits_the_projection_output_on_calibration_data(tiny_llama, method, path):
    # block 0 sees the same inputs in every variant, so its re-fit projection must reproduce the original output on
    # the calibration tokens better than plain removal (least squares, in sample); shapes are the same
    calib = _calib(n=8, seq=32)
    plain, refit = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    prune_model(plain, {"method": method, "sparsity": 0.5, "min_keep": 0.5}, calib, progress=False)
    prune_model(
        refit,
        {"method": method, "sparsity": 0.5, "min_keep": 0.5, "reconstruct": True},
        calib,
        progress=False,
    )
    assert plain.config.lmshrink_layer_shapes == refit.config.lmshrink_layer_shapes
    assert count_parameters(plain) == count_parameters(refit)
    full = f"model.layers.0.{path}"
    target = _projection_outputs(tiny_llama, full, calib)
    err_plain = float((_projection_outputs(plain, full, calib) - target).pow(2).mean())
    err_refit = float((_projection_outputs(refit, full, calib) - target).pow(2).mean())
    assert err_refit < 0.9 * err_plain


def test_reconstruct_bert_roundtrips(tiny_bert, tmp_path):
    prune_model(
        tiny_bert,
        {"method": "neurons", "sparsity": 0.4, "reconstruct": True},
        _calib(bert=True),
        progress=False,
    )
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = tiny_bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    manifest = save_pruned(tiny_bert, tmp_path, None)
    loaded, _ = load_pruned(tmp_path, manifest)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_layer_loss_importance_ranks_by_measured_loss(tiny_llama):
    from lmshrink.pruning.structured import _calibration_loss, layer_loss_importance

    calib = _calib(n=2, seq=16)
    scores = layer_loss_importance(tiny_llama, calib)
    base = _calibration_loss(tiny_llama, calib)
    for i in range(2):
        skipped = copy.deepcopy(tiny_llama)
        remove_layers(skipped, [i])
        assert scores[i] == pytest.approx(_calibration_loss(skipped, calib) - base, rel=1e-4, abs=1e-5)
    report = prune_model(
        tiny_llama, {"method": "layers", "sparsity": 0.5, "layer_importance": "loss"}, calib, progress=False
    )
    dropped = [r for r in report.layers if r.removed]
    assert [int(r.name.rsplit(".", 1)[1]) for r in dropped] == [min(range(2), key=lambda i: scores[i])]


@pytest.mark.parametrize(
    "config,match",
    [
        ({"method": "layers", "sparsity": 0.2, "reconstruct": True}, "reconstruct"),
        ({"method": "wanda", "sparsity": 0.2, "reconstruct": True}, "reconstruct"),
        ({"method": "heads", "sparsity": 0.2, "layer_importance": "loss"}, "layer_importance"),
        ({"method": "heads", "sparsity": 1.0}, r"\[0, 1\)"),
        ({"method": "neurons", "sparsity": -0.2}, r"\[0, 1\)"),
        ({"method": "layers", "sparsity": 2}, r"\[0, 1\)"),
        ({"method": "heads", "nm": "2:4"}, "unstructured"),
    ],
)
def test_structured_bad_configs(tiny_llama, config, match):
    with pytest.raises(LmshrinkError, match=match):
        prune_model(tiny_llama, config, _calib(), progress=False)
