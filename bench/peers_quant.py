"""Quantization: lmshrink against torch ``quantize_dynamic``, bitsandbytes, HQQ, optimum-quanto and torchao on CPU.

Every tool quantizes the same layers (all linear layers of the transformer blocks; embeddings and the tied LM head
stay float32) of the same float32 model, and is scored on the same windows. 4-bit rows use groups of 64 input
columns wherever the tool lets us choose (SmolLM2's hidden size 576 is not a multiple of 128).

    .venv/bin/python bench/peers_quant.py                 # the full table (lead: quiet machine, ~25 min)
    .venv/bin/python bench/peers_quant.py --list          # row keys
    .venv/bin/python bench/peers_quant.py --rows bnb-int8,hqq-4 --max-tokens 8192
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Context,
    LinearSelection,
    Row,
    parse_settings,
    replace_linears,
    run_table,
    save_flat_safetensors,
    save_lmshrink,
)

GROUP = 64


# --------------------------------------------------------------------------------------------- torch


def torch_dynamic(per_channel: bool):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        spec = dict.fromkeys(LinearSelection.of(model).names, qconfig)
        return quantize_dynamic(model, spec, dtype=torch.qint8)

    return compress


# --------------------------------------------------------------------------------------------- bitsandbytes


def bnb_int8(model: nn.Module, ctx: Context) -> nn.Module:
    import bitsandbytes as bnb

    def make(name: str, lin: nn.Linear) -> nn.Module:
        q = bnb.nn.Linear8bitLt(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
        )
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return q.to("cpu")  # quantizes the weight (row-wise absmax int8) on the move

    return replace_linears(model, make)


def bnb_4bit(quant_type: str):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        import bitsandbytes as bnb

        def make(name: str, lin: nn.Linear) -> nn.Module:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=False,
                quant_type=quant_type,
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.clone(),
                requires_grad=False,
                quant_type=quant_type,
                blocksize=GROUP,
                compress_statistics=False,
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            return q.to("cpu")

        return replace_linears(model, make)

    return compress


# --------------------------------------------------------------------------------------------- HQQ


def hqq(nbits: int):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=nbits, group_size=GROUP)

        def make(name: str, lin: nn.Linear) -> nn.Module:
            return HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu", del_orig=True)

        return replace_linears(model, make)

    return compress


# --------------------------------------------------------------------------------------------- optimum-quanto


def _outside_inference_mode(module: nn.Module) -> None:
    """Run ``module.forward`` with inference mode switched off (gradients still off).

    optimum-quanto's qint4 weights (``WeightQBitsTensor``) fail under ``torch.inference_mode`` — which the shared
    evaluation and speed harness use for every tool — with "Cannot set version_counter for inference tensor" (the
    tensor subclass re-wraps its inner tensors on every op). This changes no numbers: the same forward runs under
    ``torch.no_grad`` instead.
    """
    inner = module.forward

    def forward(*args: object, **kwargs: object) -> object:
        with torch.inference_mode(False), torch.no_grad():
            return inner(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def quanto(bits: int):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from optimum.quanto import freeze, qint4, qint8, quantize
        from optimum.quanto.nn import QModuleMixin

        names = LinearSelection.of(model).names
        quantize(model, weights=qint8 if bits == 8 else qint4, include=names)
        freeze(model)
        if bits == 4:
            for m in model.modules():
                if isinstance(m, QModuleMixin):
                    _outside_inference_mode(m)
        return model

    return compress


# --------------------------------------------------------------------------------------------- torchao


def torchao(kind: str):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup

        # torchao's CPU int4 (tinygemm _weight_int4pack_mm_for_cpu) is fast for bf16 activations only
        if kind == "int4-cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            model = model.to(torch.bfloat16)
            names = set(LinearSelection.of(model).names)
            quantize_(
                model,
                PrototypeInt4WeightOnlyConfig(group_size=GROUP, set_inductor_config=False),
                filter_fn=lambda m, fqn: fqn in names,
            )
            return model
        configs = {
            "int8wo": lambda: Int8WeightOnlyConfig(),
            "w8a8": lambda: Int8DynamicActivationInt8WeightConfig(),
            "int4wo": lambda: Int4WeightOnlyConfig(group_size=GROUP),
            "intx4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)),
        }
        names = set(LinearSelection.of(model).names)
        quantize_(model, configs[kind](), filter_fn=lambda m, fqn: fqn in names)
        return model

    return compress


# --------------------------------------------------------------------------------------------- lmshrink


def lmshrink(embeddings: bool = False, **config: object):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from lmshrink.quantization import QuantConfig, quantize_model

        cfg = QuantConfig(**config)  # type: ignore[arg-type]
        calib = ctx.calibration() if cfg.needs_calibration else None
        return quantize_model(model, cfg, calibration=calib, embeddings=embeddings)

    return compress


def save_lmshrink_or_flat(model: nn.Module, out: Path, ctx: Context) -> str:
    """lmshrink's own format; flat safetensors (said so) while its quantized storage is not in the tree."""
    try:
        return save_lmshrink(model, out, ctx)
    except Exception as exc:  # storage handler missing: still report a real size, and say which
        return (
            save_flat_safetensors(model, out, ctx) + f" [lmshrink save failed: {type(exc).__name__}: {exc}]"
        )


LM = ("lmshrink.quantization.api",)
ROWS: list[Row] = [
    # ---- 8-bit
    Row(
        "torch-dynamic-int8",
        "torch",
        "quantize_dynamic int8 (per-tensor W, dynamic A)",
        "W8A8",
        torch_dynamic(False),
        needs=("torch.ao.quantization",),
        note="fbgemm; torch.save would pickle",
    ),
    Row(
        "torch-dynamic-int8-pc",
        "torch",
        "quantize_dynamic int8 (per-channel W, dynamic A)",
        "W8A8",
        torch_dynamic(True),
        needs=("torch.ao.quantization",),
    ),
    Row("bnb-int8", "bitsandbytes", "LLM.int8 (threshold 6.0)", "W8", bnb_int8, needs=("bitsandbytes",)),
    Row("quanto-int8", "optimum-quanto", "qint8 weights", "W8", quanto(8), needs=("optimum.quanto",)),
    Row("torchao-int8wo", "torchao", "Int8WeightOnlyConfig", "W8", torchao("int8wo"), needs=("torchao",)),
    Row(
        "torchao-w8a8",
        "torchao",
        "Int8DynamicActivationInt8WeightConfig",
        "W8A8",
        torchao("w8a8"),
        needs=("torchao",),
    ),
    Row(
        "lmshrink-int8-w8a8",
        "lmshrink",
        "RTN int8 per-channel, dynamic int8 A (per token)",
        "W8A8",
        lmshrink(method="rtn", format="int8", activations="int8"),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int8-wo",
        "lmshrink",
        "RTN int8 per-channel, weight-only",
        "W8",
        lmshrink(method="rtn", format="int8", activations="float"),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int8-wo-head",
        "lmshrink",
        "RTN int8 per-channel, weight-only, LM head (tied embeddings) too",
        "W8",
        lmshrink(embeddings=True, method="rtn", format="int8", activations="float"),
        save_lmshrink_or_flat,
        needs=LM,
        note="every other row keeps the LM head in fp32",
        changes_remainder=True,
    ),
    Row(
        "lmshrink-smoothquant",
        "lmshrink",
        "SmoothQuant (alpha 0.5) W8A8",
        "W8A8",
        lmshrink(method="smoothquant", format="int8"),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-llm-int8",
        "lmshrink",
        "LLM.int8 (threshold 6.0)",
        "W8A8+outliers",
        lmshrink(method="llm-int8", format="int8"),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    # ---- 4-bit
    Row("bnb-nf4", "bitsandbytes", f"NF4, blocks of {GROUP}", "W4", bnb_4bit("nf4"), needs=("bitsandbytes",)),
    Row("bnb-fp4", "bitsandbytes", f"FP4, blocks of {GROUP}", "W4", bnb_4bit("fp4"), needs=("bitsandbytes",)),
    Row("hqq-4", "hqq", f"HQQ 4-bit, g{GROUP}", "W4", hqq(4), needs=("hqq",), note="PyTorch backend"),
    Row(
        "quanto-int4",
        "optimum-quanto",
        "qint4 weights (quanto groups: 96 for in=576, 128 for in=1536)",
        "W4",
        quanto(4),
        needs=("optimum.quanto",),
    ),
    Row(
        "torchao-int4wo",
        "torchao",
        f"Int4WeightOnlyConfig g{GROUP}",
        "W4",
        torchao("int4wo"),
        needs=("torchao",),
        unavailable="torchao 0.18 Int4WeightOnlyConfig has no CPU path here: plain/preshuffled need the `mslk` "
        "kernels (only a 0.0.0 placeholder on PyPI), plain_int32 says 'does not support device cpu', "
        "tile_packed_to_4d needs CUDA; torchao's CPU int4 is PrototypeInt4WeightOnlyConfig (row torchao-int4-cpu)",
    ),
    Row(
        "torchao-int4-cpu",
        "torchao",
        f"PrototypeInt4WeightOnlyConfig g{GROUP} (Int4OpaqueTensor, CPU tinygemm), model in bf16",
        "W4 (bf16 A)",
        torchao("int4-cpu"),
        needs=("torchao",),
        note="torchao's CPU int4 kernel (_weight_int4pack_mm_for_cpu) is 10-100x slower than fp32 with float32 "
        "activations, so the model is cast to bf16 first, as torchao's CPU recipe does; non-linear ops run in bf16",
        changes_remainder=True,
    ),
    Row(
        "torchao-intx4",
        "torchao",
        f"IntxWeightOnlyConfig int4 g{GROUP}",
        "W4 (int8 storage)",
        torchao("intx4"),
        needs=("torchao",),
        note="torchao's CPU int4 path; codes unpacked to int8 (IntxUnpackedToInt8Tensor)",
    ),
    Row(
        "lmshrink-int4-rtn",
        "lmshrink",
        f"RTN int4 g{GROUP}",
        "W4",
        lmshrink(method="rtn", format="int4", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-gptq",
        "lmshrink",
        f"GPTQ int4 g{GROUP}",
        "W4",
        lmshrink(method="gptq", format="int4", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-awq",
        "lmshrink",
        f"AWQ int4 g{GROUP}",
        "W4",
        lmshrink(method="awq", format="int4", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-awq-head",
        "lmshrink",
        f"AWQ int4 g{GROUP}, LM head (tied embeddings) RTN int4 too",
        "W4",
        lmshrink(embeddings=True, method="awq", format="int4", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
        note="every other row keeps the LM head in fp32",
        changes_remainder=True,
    ),
    Row(
        "lmshrink-int4-asym-rtn",
        "lmshrink",
        f"RTN int4-asym g{GROUP}",
        "W4",
        lmshrink(method="rtn", format="int4-asym", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-asym-gptq",
        "lmshrink",
        f"GPTQ int4-asym g{GROUP}",
        "W4",
        lmshrink(method="gptq", format="int4-asym", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-asym-gptq-clip",
        "lmshrink",
        f"GPTQ int4-asym g{GROUP}, MSE-searched clipping",
        "W4",
        lmshrink(method="gptq", format="int4-asym", group_size=GROUP, clip_search=True),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-asym-awq",
        "lmshrink",
        f"AWQ int4-asym g{GROUP}",
        "W4",
        lmshrink(method="awq", format="int4-asym", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-int4-asym-awq-clip",
        "lmshrink",
        f"AWQ int4-asym g{GROUP}, clip search",
        "W4",
        lmshrink(method="awq", format="int4-asym", group_size=GROUP, clip_search=True),
        save_lmshrink_or_flat,
        needs=LM,
    ),
    Row(
        "lmshrink-nf4",
        "lmshrink",
        f"RTN NF4 g{GROUP}",
        "W4",
        lmshrink(method="rtn", format="nf4", group_size=GROUP),
        save_lmshrink_or_flat,
        needs=LM,
    ),
]


def main(argv: list[str] | None = None) -> None:
    # defaults sized so that the whole table (23 rows, quality + paired speed) fits in about 25 minutes on a quiet
    # 2-core machine: 8192 evaluation tokens (4 windows of 2048), 3 timed repeats, 16 decode tokens, 32 calibration
    # windows; pass --max-tokens 16384 --speed-repeats 5 --decode-tokens 32 --calib-samples 128 for a longer run
    settings = parse_settings(
        (__doc__ or "").splitlines()[0],
        argv,
        max_tokens=8192,
        speed_repeats=3,
        speed_warmup=1,
        decode_tokens=16,
        calib_samples=32,
    )
    run_table("quant", "Quantization vs peers (CPU)", ROWS, settings)


if __name__ == "__main__":
    main()
