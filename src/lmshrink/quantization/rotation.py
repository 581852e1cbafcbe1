"""Residual-stream rotation before quantization (QuaRot, Ashkboos et al. 2024; SpinQuant's R1, not learned).

In a pre-norm transformer with RMSNorm, the residual stream can be multiplied by any orthogonal ``Q`` without
changing the function: fold each norm's gain into the linear layers that read it (``W <- W diag(g)``, gain set
to 1; RMSNorm commutes with ``Q`` because ``||x Q|| = ||x||``), then give every layer that reads the stream the
weight ``W Q`` and every layer that writes it (``o_proj``, ``down_proj``) ``Q^T W``. A random orthogonal ``Q``
spreads the few outlier channels of the stream over all channels, so per-token int8 activations (W8A8) and
low-bit weights lose much less. Here ``Q`` is a randomized Hadamard matrix, ``diag(+-1) (H_a (x) R_m)`` for
``n = a * m`` with ``a`` the largest power of two dividing ``n`` and ``R_m`` a random orthogonal ``m x m``
matrix (a pure randomized Hadamard when ``n`` is a power of two).

``mlp.down_proj`` reads the SwiGLU product, not the stream, and its input has the worst outliers of the block;
with ``online_hadamard`` (QuaRot's R4) it becomes :class:`HadamardInput`: the input is multiplied online by a
block-diagonal Walsh-Hadamard matrix ``H`` (blocks of the largest power of two dividing the width, at most 4096;
smollm2-135m: 3 blocks of 512, applied as two small matmuls, 48 multiply-adds per element) and the weight
stored as ``W H``.

The embedding table and the LM head stay as they are (so tied tables stay tied): the stream is rotated online
after the embedding lookup and rotated back just before the final norm, one ``n x n`` product per token at each
end (smollm2-135m: 2 x 576^2 multiply-adds per token, 0.5% of the model's 134 M). ``Q`` is stored as the buffer
``lmshrink_rotation`` of the final norm, so saved models carry it and :func:`restore_rotation` reinstates the
two hooks at load time.

Supported: Llama-family blocks (``input_layernorm`` / ``post_attention_layernorm`` RMSNorms, ``self_attn.{q,k,v,o}
_proj``, ``mlp.{gate,up,down}_proj``): Llama, SmolLM, Mistral, Qwen2/3. Anything else is refused before any
weight changes.

>>> import torch
>>> q = rotation_matrix(24, seed=0)
>>> bool(torch.allclose(q @ q.T, torch.eye(24, dtype=q.dtype), atol=1e-12))
True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import find_layers, set_submodule

#: Buffer name of the rotation matrix (on the final norm module).
ROTATION_BUFFER = "lmshrink_rotation"

#: Each block norm and the layers that read its output (they take its gain and ``Q``).
_READS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_WRITES = ("self_attn.o_proj", "mlp.down_proj")


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``(n, n)`` float64 matrix: ``diag(+-1) (H_a (x) R_m) / sqrt(a)`` (see the module)."""
    if n < 1:
        raise LmshrinkError(f"rotation size must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    a = n & -n
    m = n // a
    r = torch.ones(1, 1, dtype=torch.float64)
    if m > 1:
        r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0].contiguous()
    q = torch.kron(_sylvester(a) / math.sqrt(a), r)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs[:, None] * q


#: Largest online Hadamard block.
MAX_HADAMARD_BLOCK = 4096


def hadamard_block(n: int) -> int:
    """The online Hadamard block for a width ``n``: the largest power of two dividing ``n``, at most 4096."""
    return min(n & -n, MAX_HADAMARD_BLOCK)


@functools.lru_cache(maxsize=32)
def _walsh(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (_sylvester(n) / math.sqrt(n)).to(device=device, dtype=dtype)


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ H`` for ``H`` block-diagonal with normalized Walsh-Hadamard blocks of size ``block`` (a power of two
    dividing ``x.shape[-1]``). ``H_(ab) = H_a (x) H_b``, so each block is two small matmuls: ``H_a X H_b``."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise LmshrinkError(f"Hadamard block must be a power of two dividing {n}, got {block}")
    a = 1 << ((block.bit_length() - 1) // 2)
    b = block // a
    y = x.reshape(-1, n // block, a, b)
    y = _walsh(a, x.device, x.dtype) @ y @ _walsh(b, x.device, x.dtype)
    return y.reshape(x.shape)


class HadamardInput(nn.Module):
    """``inner(x H)`` with ``H`` block-diagonal Walsh-Hadamard (:func:`block_hadamard`); ``inner`` holds ``W H``,
    so the pair computes the original layer. ``inner`` may be float or a quantized layer."""

    def __init__(self, inner: nn.Module, block: int) -> None:
        super().__init__()
        self.inner = inner
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(block_hadamard(x, self.block))  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"block={self.block}"


@dataclass
class _Plan:
    hidden: int
    norm: nn.Module  # the final norm (holds the buffer)
    blocks: list[nn.Module]


def _sub(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _check_norm(where: str, norm: nn.Module | None, hidden: int) -> None:
    name = type(norm).__name__
    if norm is None or not name.endswith("RMSNorm") or name.startswith("Gemma"):
        raise LmshrinkError(
            f"rotation needs an RMSNorm (weight * x / rms(x)) at {where}, found {name if norm else 'nothing'}; "
            "supported: Llama-family models (Llama, SmolLM, Mistral, Qwen2/3)"
        )
    w = getattr(norm, "weight", None)
    if (
        not isinstance(w, torch.Tensor)
        or tuple(w.shape) != (hidden,)
        or getattr(norm, "bias", None) is not None
    ):
        raise LmshrinkError(f"rotation: the norm at {where} must have a ({hidden},) weight and no bias")


def _final_norm(model: nn.Module) -> nn.Module | None:
    norm = getattr(getattr(model, "base_model", model), "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def _plan(model: nn.Module) -> _Plan:
    """Check that ``model`` can be rotated (raises :class:`LmshrinkError` naming what is missing)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise LmshrinkError("rotation needs a transformers model whose config has hidden_size")
    norm = _final_norm(model)
    _check_norm("the final norm (model.norm)", norm, hidden)
    assert norm is not None
    if hasattr(norm, ROTATION_BUFFER):
        raise LmshrinkError("the model is already rotated (it holds a rotation matrix); rotate a float model")
    get_emb = getattr(model, "get_input_embeddings", None)
    if not callable(get_emb) or get_emb() is None:
        raise LmshrinkError("rotation needs the model's input embedding (get_input_embeddings)")
    path, blocks = find_layers(model)
    for i, block in enumerate(blocks):
        where = f"{path}.{i}"
        for norm_name, lins in _READS:
            _check_norm(f"{where}.{norm_name}", _sub(block, norm_name), hidden)
            for lin in lins:
                _check_linear(where, lin, _sub(block, lin), hidden, reads=True)
        for lin in _WRITES:
            _check_linear(where, lin, _sub(block, lin), hidden, reads=False)
    return _Plan(hidden, norm, list(blocks))


def _weight(mod: nn.Module) -> torch.Tensor:
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w


def _check_linear(where: str, name: str, mod: nn.Module | None, hidden: int, reads: bool) -> None:
    if not isinstance(mod, nn.Linear):
        raise LmshrinkError(
            f"rotation needs an unquantized nn.Linear at {where}.{name}, found "
            f"{type(mod).__name__ if mod is not None else 'nothing'} (rotate before quantizing; Llama-family only)"
        )
    dim = mod.in_features if reads else mod.out_features
    if dim != hidden:
        raise LmshrinkError(
            f"rotation: {where}.{name} has {dim} features on the residual side, expected {hidden}"
        )


def check_rotatable(model: nn.Module) -> None:
    """Raise :class:`LmshrinkError` if :func:`rotate_model` cannot rotate ``model``; change nothing."""
    _plan(model)


class _RotateOutput:
    """Forward hook on the input embedding: ``out @ Q`` (computed in float32)."""

    def __init__(self, holder: nn.Module) -> None:
        self.holder = holder

    def __call__(self, _mod: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        q = getattr(self.holder, ROTATION_BUFFER)
        return (out.float() @ q.float()).to(out.dtype)


class _UnrotateInput:
    """Forward pre-hook on the final norm: ``x @ Q^T`` before it normalises."""

    def __call__(self, mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        q = getattr(mod, ROTATION_BUFFER)
        return ((x.float() @ q.float().T).to(x.dtype), *args[1:])


def _remove_hooks(mod: nn.Module) -> None:
    for hooks in (mod._forward_hooks, mod._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _RotateOutput | _UnrotateInput)]:
            del hooks[key]


def install_rotation(model: nn.Module) -> None:
    """(Re)install the two online hooks of a rotated model, e.g. after its embedding module was replaced."""
    norm = _final_norm(model)
    if norm is None or not hasattr(norm, ROTATION_BUFFER):
        raise LmshrinkError("the model holds no rotation matrix (rotate_model first)")
    emb = model.get_input_embeddings()  # type: ignore[operator]
    for mod in (emb, norm):
        _remove_hooks(mod)
    emb.register_forward_hook(_RotateOutput(norm))
    norm.register_forward_pre_hook(_UnrotateInput())


def is_rotated(model: nn.Module) -> bool:
    norm = _final_norm(model)
    return norm is not None and hasattr(norm, ROTATION_BUFFER)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_hadamard: bool = True) -> torch.Tensor:
    """Rotate ``model``'s residual stream in place (same function up to float rounding); return ``Q`` (float64).
    ``online_hadamard``: also wrap each ``mlp.down_proj`` in :class:`HadamardInput` (weight folded).

    Checks everything first (:func:`check_rotatable`), so a model it refuses is left unchanged.
    """
    plan = _plan(model)
    q = rotation_matrix(plan.hidden, seed)
    for block in plan.blocks:
        for norm_name, lins in _READS:
            gain = _weight(block.get_submodule(norm_name))
            g = gain.double()
            for lin_name in lins:
                w = _weight(block.get_submodule(lin_name))
                w.copy_(((w.double() * g[None, :]) @ q.to(w.device)).to(w.dtype))
            gain.fill_(1.0)
        for lin_name in _WRITES:
            lin = block.get_submodule(lin_name)
            w = _weight(lin)
            w.copy_((q.T.to(w.device) @ w.double()).to(w.dtype))
            if isinstance(lin, nn.Linear) and lin.bias is not None:
                lin.bias.copy_((lin.bias.double() @ q.to(w.device)).to(lin.bias.dtype))
        if online_hadamard:
            down = block.get_submodule("mlp.down_proj")
            w = _weight(down)
            size = hadamard_block(w.shape[1])
            w.copy_(block_hadamard(w.double(), size).to(w.dtype))
            set_submodule(block, "mlp.down_proj", HadamardInput(down, size))
    device = _weight(plan.norm).device
    plan.norm.register_buffer(ROTATION_BUFFER, q.float().to(device))
    install_rotation(model)
    return q


def restore_rotation(model: nn.Module, online_hadamard: bool) -> None:
    """For loading a saved rotated model (float skeleton, before its layers are swapped for quantized ones): an
    empty ``(n, n)`` rotation buffer (filled by ``load_state_dict``), the hooks, and the ``HadamardInput``
    wrappers."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    norm = _final_norm(model)
    if not isinstance(hidden, int) or norm is None:
        raise LmshrinkError("the saved quantization config says 'rotate', but the model has no final norm")
    norm.register_buffer(ROTATION_BUFFER, torch.zeros(hidden, hidden, device=_weight(norm).device))
    install_rotation(model)
    if online_hadamard:
        for block in find_layers(model)[1]:
            down = _sub(block, "mlp.down_proj")
            if not isinstance(down, nn.Linear):
                raise LmshrinkError("the saved config has online_hadamard, but a block has no mlp.down_proj")
            set_submodule(block, "mlp.down_proj", HadamardInput(down, hadamard_block(down.in_features)))


def check_orthogonal(q: torch.Tensor, atol: float = 1e-4) -> bool:
    """True if ``q`` is square, finite and orthogonal within ``atol`` (a tampered file fails this)."""
    if q.dim() != 2 or q.shape[0] != q.shape[1] or not torch.isfinite(q).all():
        return False
    eye = torch.eye(q.shape[0], dtype=torch.float64, device=q.device)
    return bool(torch.allclose(q.double() @ q.double().T, eye, atol=atol))
