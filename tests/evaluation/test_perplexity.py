"""Perplexity harness: agreement with an independent plain loop, protocols, word level, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lmshrink.evaluation.perplexity as ppl_mod
from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import PerplexityResult, evaluate_perplexity

TEXT = " ".join(
    ["the cat sat on the mat and looked at the dog", "a bird flew over the old house near the river"] * 40
)


def make_tokenizer(text: str = TEXT, vocab_size: int = 128):
    """A BPE tokenizer with at most ``vocab_size`` ids (fits the tiny models), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def plain_gptq_ppl(model, ids: torch.Tensor, ctx: int) -> float:
    """Independent reference: non-overlapping windows, transformers forward + F.cross_entropy."""
    n = ids.numel() // ctx
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = ids[i * ctx : (i + 1) * ctx].unsqueeze(0)
            logits = model(input_ids=x).logits.float()
            total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += ctx - 1
    return math.exp(total / count)


def plain_stride_ppl(model, ids: torch.Tensor, ctx: int, stride: int) -> float:
    """Independent reference: the Hugging Face sliding-window recipe (labels -100 on the context part)."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), stride):
            end = min(begin + ctx, ids.numel())
            trg_len = end - prev_end
            x = ids[begin:end].unsqueeze(0)
            labels = x.clone()
            labels[:, :-trg_len] = -100
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum", ignore_index=-100)
            total += nll.item()
            count += int((labels[0, 1:] != -100).sum())
            prev_end = end
            if end == ids.numel():
                break
    return math.exp(total / count)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1000,), generator=torch.Generator().manual_seed(0))


def test_gptq_matches_plain_loop(tiny_llama, ids):
    r = evaluate_perplexity(tiny_llama, None, ids, ctx=128, progress=False)
    ref = plain_gptq_ppl(tiny_llama, ids, 128)
    assert abs(r.perplexity / ref - 1) < 1e-3
    assert r.n_windows == 7 and r.n_tokens == 7 * 127
    assert r.protocol["dropped_tail_tokens"] == 1000 - 7 * 128
    assert r.perplexity == r.token_perplexity
    assert math.isclose(math.log(r.perplexity), r.nll, rel_tol=1e-9)
    assert 0.0 <= r.next_token_accuracy <= 1.0


def test_batching_and_chunking_do_not_change_result(tiny_llama, ids, monkeypatch):
    base = evaluate_perplexity(tiny_llama, None, ids, ctx=128, progress=False)
    monkeypatch.setattr(ppl_mod, "CHUNK_POSITIONS", 7)
    other = evaluate_perplexity(tiny_llama, None, ids, ctx=128, batch_size=3, progress=False)
    assert abs(other.perplexity / base.perplexity - 1) < 1e-5
    assert other.next_token_accuracy == pytest.approx(base.next_token_accuracy)


def test_next_token_accuracy_matches_plain_argmax(tiny_llama, ids):
    r = evaluate_perplexity(tiny_llama, None, ids, ctx=200, progress=False)
    correct = 0
    with torch.no_grad():
        for i in range(5):
            x = ids[i * 200 : (i + 1) * 200].unsqueeze(0)
            correct += int((tiny_llama(input_ids=x).logits[0, :-1].argmax(-1) == x[0, 1:]).sum())
    assert r.next_token_accuracy == pytest.approx(correct / (5 * 199))


@pytest.mark.parametrize(("ctx", "stride"), [(128, 64), (100, 30), (64, 64)])
def test_stride_matches_hf_recipe(tiny_llama, ids, ctx, stride):
    ids = ids[:500]
    r = evaluate_perplexity(
        tiny_llama, None, ids, protocol="stride", ctx=ctx, stride=stride, batch_size=4, progress=False
    )
    assert abs(r.perplexity / plain_stride_ppl(tiny_llama, ids, ctx, stride) - 1) < 1e-3
    assert r.protocol["stride"] == stride and r.protocol["dropped_tail_tokens"] == 0


def test_stride_scores_every_token_once(tiny_llama, ids):
    r = evaluate_perplexity(tiny_llama, None, ids, protocol="stride", ctx=128, stride=50, progress=False)
    assert r.n_tokens == ids.numel() - 1


def _trained_periodic_model():
    """A tiny Llama trained 40 steps on a period-24 sequence over 6 symbols: context clearly helps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, 6, (24,), generator=g).repeat(200)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        starts = torch.randint(0, stream.numel() - 65, (8,), generator=g)
        x = torch.stack([stream[s : s + 64] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), stream[:1024]


def test_sliding_window_not_worse_than_non_overlapping():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and much faster on a busy machine
    try:
        model, stream = _trained_periodic_model()
        gptq = evaluate_perplexity(model, None, stream, ctx=32, batch_size=16, progress=False)
        stride = evaluate_perplexity(
            model, None, stream, ctx=32, protocol="stride", stride=8, batch_size=16, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    assert stride.perplexity < gptq.perplexity * 0.98


def test_text_input_and_word_level(tiny_llama):
    tok = make_tokenizer()
    n_ids = len(tok(TEXT)["input_ids"])
    r = evaluate_perplexity(tiny_llama, tok, TEXT, protocol="stride", ctx=64, word_level=True, progress=False)
    assert r.n_words == len(TEXT.split())
    assert r.n_tokens == n_ids - 1
    assert r.perplexity == pytest.approx(math.exp(r.total_nll / r.n_words))
    assert r.token_perplexity == pytest.approx(math.exp(r.total_nll / r.n_tokens))
    assert r.protocol["level"] == "word" and r.data.startswith("raw text")


def test_word_level_counts_only_covered_text(tiny_llama):
    tok = make_tokenizer()
    r = evaluate_perplexity(tiny_llama, tok, TEXT, ctx=64, max_tokens=200, word_level=True, progress=False)
    covered = tok.decode(tok(TEXT)["input_ids"][:192])
    assert r.n_words == len(covered.split())
    assert r.protocol["truncated_from"] is not None and r.n_windows == 3


def test_text_file_input(tiny_llama, tmp_path):
    tok = make_tokenizer()
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    a = evaluate_perplexity(tiny_llama, tok, f, ctx=64, progress=False)
    b = evaluate_perplexity(tiny_llama, tok, TEXT, ctx=64, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity) and a.data.startswith("file")


def test_max_tokens_truncates(tiny_llama, ids):
    r = evaluate_perplexity(tiny_llama, None, ids, ctx=100, max_tokens=300, progress=False)
    assert r.n_windows == 3 and r.protocol["tokens_in_stream"] == 300 and r.protocol["truncated_from"] == 1000


def test_default_ctx_is_capped_by_model_maximum(tiny_llama):
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(1))
    r = evaluate_perplexity(tiny_llama, None, ids, progress=False)
    assert r.protocol["ctx"] == 256 and r.n_windows == 2


def test_result_is_json_serializable(tiny_llama, ids):
    import json

    r = evaluate_perplexity(tiny_llama, None, ids, ctx=128, progress=False)
    back = json.loads(r.to_json())
    assert back["kind"] == "perplexity" and back["protocol"]["name"] == "gptq"
    assert back["provenance"]["device"] == "cpu" and "torch" in back["provenance"]["versions"]
    assert PerplexityResult.model_validate(back).perplexity == pytest.approx(r.perplexity)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ctx": 512}, "exceeds the model's maximum"),
        ({"ctx": 1}, "at least 2"),
        ({"protocol": "nope"}, "unknown perplexity protocol"),
        ({"ctx": 128, "stride": 10}, "stride only applies"),
        ({"protocol": "stride", "ctx": 64, "stride": 65}, "stride must be between"),
        ({"ctx": 128, "batch_size": 0}, "batch_size"),
        ({"ctx": 128, "max_tokens": 1}, "max_tokens"),
        ({"ctx": 128, "word_level": True}, "tokenizer"),
    ],
)
def test_bad_arguments(tiny_llama, ids, kwargs, match):
    with pytest.raises(LmshrinkError, match=match):
        evaluate_perplexity(tiny_llama, None, ids, progress=False, **kwargs)


def test_bad_data(tiny_llama, tiny_bert):
    tok = make_tokenizer()
    with pytest.raises(LmshrinkError, match="empty"):
        evaluate_perplexity(tiny_llama, tok, "   \n ", ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="fewer than one window"):
        evaluate_perplexity(tiny_llama, None, torch.arange(50), ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="does not belong to this model"):
        evaluate_perplexity(tiny_llama, None, torch.arange(300), ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="1-D integer tensor"):
        evaluate_perplexity(tiny_llama, None, torch.rand(100), ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="tokenizer is required"):
        evaluate_perplexity(tiny_llama, None, "some raw text here", ctx=64, progress=False)
    with pytest.raises(LmshrinkError, match="not a causal language model"):
        evaluate_perplexity(tiny_bert, tok, TEXT, ctx=64, progress=False)


@pytest.mark.reference
def test_reference_model_matches_plain_loop_and_stride_helps(data_dir):
    from lmshrink.models import load_model

    model, tok = load_model("smollm2-135m")
    r = evaluate_perplexity(model, tok, "wikitext2", max_tokens=4096, progress=False)
    ids = ppl_mod.resolve_tokens(tok, "wikitext2", 4096).ids
    assert r.n_windows == 2 and r.protocol["ctx"] == 2048
    assert abs(r.perplexity / plain_gptq_ppl(model, ids, 2048) - 1) < 1e-3
    assert 5 < r.perplexity < 60
    gptq = evaluate_perplexity(model, None, ids[:1024], ctx=256, batch_size=4, progress=False)
    stride = evaluate_perplexity(
        model, None, ids[:1024], ctx=256, protocol="stride", stride=128, batch_size=3, progress=False
    )
    assert stride.perplexity <= gptq.perplexity
