"""Agreement with a reference: KL(ref || model), top-1 agreement, both perplexities on the same windows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import evaluate_agreement, evaluate_perplexity


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))


def test_model_against_itself(tiny_llama, ids):
    r = evaluate_agreement(tiny_llama, tiny_llama, None, ids, ctx=128, progress=False)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert r.top1_agreement == 1.0
    assert r.perplexity == pytest.approx(r.reference_perplexity)
    assert r.n_windows == 4 and r.n_tokens == 4 * 127


def test_matches_plain_computation_and_perplexity(tiny_llama, ids):
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    r = evaluate_agreement(other, tiny_llama, None, ids, ctx=128, batch_size=2, progress=False)
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for i in range(4):
            x = ids[i * 128 : (i + 1) * 128].unsqueeze(0)
            lp = F.log_softmax(other(input_ids=x).logits[0, :-1].float(), -1)
            lq = F.log_softmax(tiny_llama(input_ids=x).logits[0, :-1].float(), -1)
            kl += F.kl_div(lp, lq, log_target=True, reduction="sum").item()  # KL(ref || model)
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += 127
    assert r.kl_mean == pytest.approx(kl / n, rel=1e-3)
    assert r.kl_mean > 0
    assert r.top1_agreement == pytest.approx(agree / n)
    ppl = evaluate_perplexity(other, None, ids, ctx=128, progress=False).perplexity
    ref_ppl = evaluate_perplexity(tiny_llama, None, ids, ctx=128, progress=False).perplexity
    assert r.perplexity == pytest.approx(ppl, rel=1e-4)
    assert r.reference_perplexity == pytest.approx(ref_ppl, rel=1e-4)


def test_stride_protocol(tiny_llama, ids):
    r = evaluate_agreement(
        tiny_llama, tiny_llama, None, ids, protocol="stride", ctx=128, stride=32, progress=False
    )
    assert r.n_tokens == ids.numel() - 1 and r.protocol["name"] == "stride"


def test_bad_inputs(tiny_llama, tiny_bert, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    other_vocab = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=200
        )
    ).eval()
    with pytest.raises(LmshrinkError, match="different vocabularies"):
        evaluate_agreement(tiny_llama, other_vocab, None, ids, ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="not a causal language model"):
        evaluate_agreement(tiny_llama, tiny_bert, None, ids, ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="exceeds"):
        evaluate_agreement(tiny_llama, tiny_llama, None, ids, ctx=1024, progress=False)
