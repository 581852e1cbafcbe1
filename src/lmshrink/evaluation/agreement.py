"""Agreement of a compressed causal LM with its reference on the same windows: KL, top-1, both perplexities."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.evaluation.perplexity import (
    PROTOCOLS,
    DataSpec,
    LogitSource,
    Window,
    _tokenizer_name,
    batches_of,
    check_causal_lm,
    check_token_range,
    chunk_bounds,
    chunk_size,
    make_windows,
    model_device,
    model_dtype,
    model_name,
    place_model,
    resolve_ctx,
    resolve_tokens,
    stack_windows,
)
from lmshrink.evaluation.results import AgreementResult
from lmshrink.utils.env import provenance


@torch.inference_mode()
def _compare(
    model: nn.Module,
    reference: nn.Module,
    ids: torch.Tensor,
    windows: list[Window],
    batch_size: int,
    devices: tuple[torch.device, torch.device],
    progress: bool,
) -> dict[str, float]:
    src, ref_src = LogitSource(model), LogitSource(reference)
    sums = {"kl": 0.0, "nll": 0.0, "ref_nll": 0.0, "agree": 0.0, "n": 0.0}
    bar = tqdm(total=len(windows), desc="agreement", unit="win", disable=not progress, leave=False)
    for group in batches_of(windows, batch_size):
        x = stack_windows(ids, group, devices[0])  # (B, T)
        state = src.run(x)
        ref_state = ref_src.run(x.to(devices[1]))
        for lo, hi in chunk_bounds(group[0].score_from, x.shape[1], chunk_size(len(group))):
            target = x[:, lo + 1 : hi + 1].unsqueeze(-1)  # (B, C, 1)
            logp = torch.log_softmax(src.logits(state, lo, hi), dim=-1)  # (B, C, V)
            ref_logp = torch.log_softmax(ref_src.logits(ref_state, lo, hi).to(logp.device), dim=-1)
            if logp.shape[-1] != ref_logp.shape[-1]:
                raise LmshrinkError(
                    f"model and reference have different vocabularies ({logp.shape[-1]} vs {ref_logp.shape[-1]})"
                )
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, C)
            sums["kl"] += float(kl.double().sum())
            sums["nll"] -= float(logp.gather(-1, target).double().sum())
            sums["ref_nll"] -= float(ref_logp.gather(-1, target.to(ref_logp.device)).double().sum())
            sums["agree"] += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            sums["n"] += target.numel()
        bar.update(len(group))
    bar.close()
    if not all(math.isfinite(v) for v in sums.values()):
        raise NumericsError("non-finite log-probabilities while comparing the model with its reference")
    return sums


def evaluate_agreement(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    data: DataSpec = "wikitext2",
    *,
    protocol: str = "gptq",
    ctx: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    progress: bool = True,
    name: str | None = None,
) -> AgreementResult:
    """Mean per-token KL(reference || model) in nats, top-1 agreement, and both perplexities, computed on the same
    windows (the perplexity protocols of :func:`evaluate_perplexity`), with one forward pass of each model per
    window. ``device`` moves both models; ``None`` leaves each where it is.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, vocab_size=50, max_position_embeddings=64))
    >>> r = evaluate_agreement(m, m, None, torch.randint(0, 50, (128,)), ctx=64, progress=False)
    >>> round(r.kl_mean, 6), r.top1_agreement
    (0.0, 1.0)
    """
    check_causal_lm(model)
    check_causal_lm(reference)
    if protocol not in PROTOCOLS:
        raise LmshrinkError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    n_ctx = min(resolve_ctx(model, ctx), resolve_ctx(reference, ctx))
    stream = resolve_tokens(tokenizer, data, max_tokens)
    check_token_range(model, stream.ids)
    check_token_range(reference, stream.ids)
    windows, dropped = make_windows(stream.ids.numel(), n_ctx, protocol, stride)
    dev = place_model(model, device)
    ref_dev = place_model(reference, device) if device is not None else model_device(reference)
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        s = _compare(model, reference, stream.ids, windows, batch_size, (dev, ref_dev), progress)
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    n = s["n"]
    info: dict[str, Any] = {
        "name": protocol,
        "ctx": n_ctx,
        "stride": (stride or max(1, n_ctx // 2)) if protocol == "stride" else n_ctx,
        "level": "token",
        "kl": "KL(reference || model), nats per token, float32 log-softmax",
        "reference": model_name(reference),
        "tokenizer": _tokenizer_name(tokenizer),
        "tokens_in_stream": stream.ids.numel(),
        "truncated_from": stream.truncated_from,
        "dropped_tail_tokens": dropped,
        "batch_size": batch_size,
    }
    return AgreementResult(
        model=name or model_name(model),
        data=stream.description,
        protocol=info,
        provenance=provenance(dev, model_dtype(model)),
        kl_mean=s["kl"] / n,
        top1_agreement=s["agree"] / n,
        perplexity=math.exp(s["nll"] / n),
        reference_perplexity=math.exp(s["ref_nll"] / n),
        n_tokens=int(n),
        n_windows=len(windows),
    )
