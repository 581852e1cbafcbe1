import pytest
import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import select_linears
from lmshrink.pruning import PruneConfig, apply_weight_pruning, prune_model
from lmshrink.pruning.masks import global_threshold, layer_mask, nm_mask, parse_nm, row_mask


def test_layer_mask_exact_count():
    scores = torch.rand(7, 13)
    mask = layer_mask(scores, 0.3)
    assert int((~mask).sum()) == round(0.3 * 91)
    # the dropped scores are the smallest ones
    assert scores[~mask].max() <= scores[mask].min()


def test_row_mask_each_row():
    mask = row_mask(torch.rand(5, 20), 0.25)
    assert ((~mask).sum(dim=1) == 5).all()


def test_apply_weight_pruning_exact_sparsity_per_layer(tiny_llama):
    apply_weight_pruning(tiny_llama, 0.3)
    names = [n for n, _ in select_linears(tiny_llama)]
    assert len(names) == 14  # 7 linears x 2 blocks; lm_head skipped
    for _, mod in select_linears(tiny_llama):
        w = mod.weight
        assert int((w == 0).sum()) == round(0.3 * w.numel())
    assert (tiny_llama.lm_head.weight != 0).all()


def test_percentage_forms_agree():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    apply_weight_pruning(a, 0.2, skip=())
    apply_weight_pruning(b, 20, skip=())
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la.weight, lb.weight)
        assert abs(float((la.weight == 0).float().mean()) - 0.2) < 1 / la.weight.numel()


def test_global_scope_threshold(tiny_llama):
    weights = [m.weight.detach().abs() for _, m in select_linears(tiny_llama)]
    thr = global_threshold(weights, 0.5)
    masks = apply_weight_pruning(tiny_llama, 0.5, scope="global")
    total = sum(w.numel() for w in weights)
    assert abs(masks.overall_sparsity() - 0.5) < 2 / total
    for _, mod in select_linears(tiny_llama):
        nz = mod.weight[mod.weight != 0].abs()
        assert float(nz.min()) > thr
    # layers differ in sparsity with a global threshold
    assert len({round(s, 3) for s in masks.sparsity().values()}) > 1


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_masks_persist_through_training(tiny_llama, opt_name):
    masks = apply_weight_pruning(tiny_llama, 0.5)
    before = {n: m.weight.detach().clone() for n, m in select_linears(tiny_llama)}
    tiny_llama.train()
    params = list(tiny_llama.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        if opt_name == "sgd_momentum"
        else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        loss = tiny_llama(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mod in select_linears(tiny_llama):
        keep = masks.masks[name]
        assert (mod.weight[~keep] == 0).all(), name
        assert not torch.equal(mod.weight[keep], before[name][keep]), f"{name} did not train"


def test_optimizer_hook_reapplies_masks(tiny_llama):
    # an optimizer whose state predates pruning would move pruned weights; the step hook re-zeroes them
    params = list(tiny_llama.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ids = torch.randint(0, 128, (2, 16))
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # momentum buffers now non-zero everywhere
    masks = apply_weight_pruning(tiny_llama, 0.5, persist=False)
    masks.attach(tiny_llama, opt)
    opt.zero_grad()
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for name, mod in select_linears(tiny_llama):
        assert (mod.weight[~masks.masks[name]] == 0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_config(bad):
    with pytest.raises(LmshrinkError, match=r"\[0, 1\)"):
        prune_model(nn.Linear(4, 4), {"method": "magnitude", "sparsity": bad})


@pytest.mark.parametrize("bad", [-1, 100, 250])
def test_bad_pruning_percentage(bad):
    with pytest.raises(LmshrinkError):
        apply_weight_pruning(nn.Sequential(nn.Linear(4, 4)), bad, skip=())


def test_config_rejects_unknown_keys_and_missing_sparsity():
    with pytest.raises(ValueError):
        PruneConfig(method="magnitude", sparsity=0.5, sparsity_typo=1)  # type: ignore[call-arg]
    with pytest.raises(LmshrinkError, match="needs a sparsity"):
        prune_model(nn.Linear(4, 4), {"method": "wanda"})
    with pytest.raises(LmshrinkError, match=r"unknown|method"):
        prune_model(nn.Linear(4, 4), {"method": "random", "sparsity": 0.5})


def test_nm_mask_and_parse():
    assert parse_nm("2:4") == (2, 4)
    mask = nm_mask(torch.rand(8, 16), 2, 4)
    assert (mask.view(8, 4, 4).sum(-1) == 2).all()
    for bad in ["4:2", "2-4", "0:4", "a:b"]:
        with pytest.raises(LmshrinkError):
            parse_nm(bad)
    with pytest.raises(LmshrinkError, match="multiple of 7"):
        nm_mask(torch.rand(4, 64), 3, 7)


def test_layer_mask_ties_exact():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    mask = layer_mask(scores, 0.5)
    assert int((~mask).sum()) == 3 and mask[4:].all()
