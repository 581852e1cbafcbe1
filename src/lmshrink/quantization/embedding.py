"""``QuantEmbedding``: an ``nn.Embedding`` whose table is held in real packed low-precision storage.

The table (num_embeddings, embedding_dim) is stored exactly like a :class:`QuantLinear` weight of shape
(out=num_embeddings, in=embedding_dim): int8 codes with one scale per row, or bit-packed intN codes with one float16
scale per group of ``group_size`` columns (and zero points for asymmetric grids), or a codec format's tensors. A
lookup decodes only the rows it needs; the rows are bit-identical to the full decode of the table.

When the embedding is tied to the LM head (Llama, GPT-2, SmolLM), both hold the *same* packed tensors: the file
stores them once (storage's tied-tensor aliasing) and the size counts them once. Embeddings are quantized only on
request (``quantize_model(..., embeddings=True)``; recipes: ``quantize_embeddings: true``), with the same format
and group size as the linear layers.

>>> import torch
>>> from torch import nn
>>> from lmshrink.quantization.config import WeightSpec
>>> emb = nn.Embedding(64, 32)
>>> q = QuantEmbedding.from_embedding(emb, WeightSpec.parse("int4", group_size=16))
>>> ids = torch.tensor([[1, 5, 63]])
>>> q(ids).shape, bool(torch.equal(q(ids)[0, 2], q.dequantize_weight()[63]))
(torch.Size([1, 3, 32]), True)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.linear import QuantLinear, _int8_per_channel, unpack_bits

log = logging.getLogger(__name__)


class QuantEmbedding(QuantLinear):
    """An embedding table in packed storage (see the module docstring). ``tied_to`` names the QuantLinear (the LM
    head) whose packed tensors it shares, or is None."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spec: WeightSpec,
        *,
        padding_idx: int | None = None,
        tied_to: str | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_embeddings, spec)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.tied_to = tied_to
        # weights counted by lmshrink.evaluation.size: a tied table is the head's weight, counted there once
        self.logical_numel = 0 if tied_to else num_embeddings * embedding_dim

    # -- construction
    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: WeightSpec) -> QuantEmbedding:
        """Round-to-nearest quantization of ``embedding``'s table (rows grouped along the embedding dimension)."""
        w = embedding.weight.detach()
        src = QuantLinear.from_weight(w, None, spec)
        q = cls(w.shape[0], w.shape[1], spec, padding_idx=embedding.padding_idx)
        q.load_state_dict(src.state_dict())
        return q.to(w.device)

    @classmethod
    def tied(cls, head: QuantLinear, head_name: str, padding_idx: int | None = None) -> QuantEmbedding:
        """An embedding that shares ``head``'s packed tensors (the head's weight is the table)."""
        if head.bias is not None or head.input_scale is not None or head.act != "float":
            raise LmshrinkError(
                f"{head_name} cannot double as an embedding table: it has a bias, an input scale or int8 "
                "activations; quantize it weight-only (method rtn/gptq, activations float)"
            )
        q = cls(head.out_features, head.in_features, head.spec, padding_idx=padding_idx, tied_to=head_name)
        q.share_storage(head)
        return q

    def share_storage(self, head: QuantLinear) -> None:
        """Point this table's packed buffers at ``head``'s (same tensors, stored once)."""
        if (head.in_features, head.out_features, head.spec) != (
            self.in_features,
            self.out_features,
            self.spec,
        ):
            raise LmshrinkError(
                f"cannot tie a {self.num_embeddings}x{self.embedding_dim} {self.spec.format} table to a "
                f"{head.out_features}x{head.in_features} {head.spec.format} head"
            )
        for key, buf in self._buffers.items():
            if buf is not None and key not in ("bias", "input_scale"):
                self._buffers[key] = head._buffers[key]

    # -- lookup
    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``rows`` of the table, computed like :meth:`dequantize_weight` (bit-identical)."""
        spec, k, n = self.spec, self.in_features, rows.numel()
        if _int8_per_channel(spec):
            return self.qweight[rows].float() * self.scale[rows].reshape(n, 1)
        if spec.is_integer:
            codes = unpack_bits(self.qweight[rows], spec.bits, k).float() + self.grid.qmin
            if not spec.symmetric:
                codes = codes - self.zero[rows].float().repeat_interleave(k // self.zero.shape[1], dim=1)
            g = k if spec.group_size is None else spec.group_size
            return (codes.reshape(n, k // g, g) * self.scale[rows].float().reshape(n, -1, 1)).reshape(n, k)
        return self.dequantize_weight()[rows]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise LmshrinkError(
                f"token ids must be in [0, {self.num_embeddings}), got {int(flat.min())}..{int(flat.max())}"
            )
        uniq, inverse = torch.unique(flat, return_inverse=True)
        return F.embedding(inverse.reshape(input_ids.shape), self._rows(uniq))

    @property
    def weight(self) -> torch.Tensor:
        """The decoded float32 table (for code that reads ``get_input_embeddings().weight``)."""
        return self.dequantize_weight()

    def storage_bits(self) -> int:
        """Bits of the packed table; 0 when tied (the head's storage holds it)."""
        return 0 if self.tied_to else super().storage_bits()

    def layer_spec(self) -> dict[str, Any]:
        """The storage description (``kind: embedding``) from which :func:`restore_embeddings` rebuilds it."""
        return {
            **super().layer_spec(),
            "kind": "embedding",
            "padding_idx": self.padding_idx,
            "tied_to": self.tied_to,
        }

    def extra_repr(self) -> str:
        tied = f", tied_to={self.tied_to}" if self.tied_to else ""
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, format={self.spec.format}, "
            f"group_size={self.spec.group_size}{tied}"
        )


# ---- whole-model helpers (called by quantize_model and by storage) ---------------------------------------------
def plan_embeddings(model: nn.Module, spec: WeightSpec) -> dict[str, str | None]:
    """The ``nn.Embedding`` modules to quantize, each with the linear layer it is tied to (or None).

    Checked before any layer changes: the group size must divide every embedding dimension.
    """
    modules = dict(model.named_modules())
    plan: dict[str, str | None] = {}
    for name, mod in modules.items():
        if not isinstance(mod, nn.Embedding):
            continue
        dim = mod.embedding_dim
        if spec.group_size is not None and dim % spec.group_size:
            raise LmshrinkError(
                f"group size {spec.group_size} does not divide the dimension {dim} of embedding {name!r}; "
                "choose a divisor or leave the embeddings in float (quantize_embeddings: false)"
            )
        tied = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.Linear) and getattr(m, "weight", None) is mod.weight
        ]
        plan[name] = tied[0] if tied else None
    if not plan:
        raise LmshrinkError("embeddings=True, but the model has no nn.Embedding module")
    return plan


@torch.no_grad()
def quantize_embeddings(model: nn.Module, spec: WeightSpec, plan: dict[str, str | None]) -> list[str]:
    """Swap the planned embeddings for :class:`QuantEmbedding` (RTN). A table tied to an LM head shares the head's
    packed tensors; a head still in float (skipped) is quantized with RTN first so the tie survives."""
    from lmshrink.models.arch import set_submodule

    done = []
    for name, head_name in plan.items():
        modules = dict(model.named_modules())
        emb = modules[name]
        assert isinstance(emb, nn.Embedding)
        if head_name is None:
            set_submodule(model, name, QuantEmbedding.from_embedding(emb, spec))
        else:
            head = modules[head_name]
            if not isinstance(head, QuantLinear):
                log.warning(
                    "%s is tied to %s, which was skipped: quantizing it with RTN too", name, head_name
                )
                assert isinstance(head, nn.Linear)
                head = QuantLinear.from_weight(head.weight, head.bias, spec).to(head.weight.device)
                set_submodule(model, head_name, head)
            set_submodule(model, name, QuantEmbedding.tied(head, head_name, emb.padding_idx))
            # the packed tensors are shared by QuantEmbedding itself; transformers' float tying (tie_weights on
            # reload) must not try to alias a ``weight`` parameter that no longer exists
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        done.append(name)
    return done


def restore_embeddings(model: nn.Module, layers: dict[str, Any]) -> None:
    """Storage: swap in empty QuantEmbedding modules for the manifest's ``kind: embedding`` entries, tied as saved
    (so the skeleton's shared tensors match the file's aliases)."""
    from lmshrink.models.arch import set_submodule
    from lmshrink.quantization.storage import _spec_from_manifest

    for name, raw in layers.items():
        if not (isinstance(raw, dict) and raw.get("kind") == "embedding"):
            continue
        spec, _ = _spec_from_manifest(name, raw)
        modules = dict(model.named_modules())
        mod = modules.get(name)
        if not isinstance(mod, nn.Embedding):
            raise CorruptFileError(
                f"manifest names embedding {name!r}, which is not an nn.Embedding of the model"
            )
        if (mod.num_embeddings, mod.embedding_dim) != (raw["out_features"], raw["in_features"]):
            raise CorruptFileError(
                f"embedding {name!r}: manifest says {raw['out_features']}x{raw['in_features']}, "
                f"model has {mod.num_embeddings}x{mod.embedding_dim}"
            )
        tied_to = raw.get("tied_to")
        pad = raw.get("padding_idx")
        if tied_to is not None:
            head = modules.get(str(tied_to))
            if not isinstance(head, QuantLinear):
                raise CorruptFileError(
                    f"embedding {name!r} is tied to {tied_to!r}, which is not a quantized layer"
                )
            try:
                q = QuantEmbedding.tied(head, str(tied_to), None if pad is None else int(pad))
            except LmshrinkError as exc:
                raise CorruptFileError(f"embedding {name!r}: {exc}") from exc
        else:
            q = QuantEmbedding(
                mod.num_embeddings, mod.embedding_dim, spec, padding_idx=None if pad is None else int(pad)
            )
        set_submodule(model, name, q)
