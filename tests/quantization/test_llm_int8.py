import pytest
import torch

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.quantization.llm_int8 import int8_matmul_int32, mixed_precision_forward
from lmshrink.quantization.vector import QuantizedVector


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a shared machine, thread synchronisation costs more than it saves. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(
    tokens: int = 64, d_in: int = 256, d_out: int = 128, n_outliers: int = 4, magnitude: float = 60.0
):
    """Activations with a few outlier feature dimensions (as in LLMs: the same columns for every token)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g)
    cols = torch.randperm(d_in, generator=g)[:n_outliers]
    x[:, cols] *= magnitude
    w = torch.randn(d_in, d_out, generator=g) / d_in**0.5
    return x, w, sorted(cols.tolist())


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_outlier_handling_reduces_error():
    x, w, cols = planted()
    ref = x.double() @ w.double()
    y, stats = mixed_precision_forward(x, w, threshold=6.0, return_stats=True)
    plain = mixed_precision_forward(x, w, threshold=float("inf"))
    assert stats.outlier_columns == cols and stats.n_outlier_columns == 4
    err_mixed, err_plain = rel_err(ref, y.double()), rel_err(ref, plain.double())
    # measured: mixed 0.0013, plain int8 0.028 (the outliers blow up the per-token scales): 21x
    assert err_mixed < 0.003
    assert err_plain > 10 * err_mixed


def test_int32_accumulation_is_exact():
    x, w, _ = planted(tokens=33, d_in=96, d_out=40)  # odd shapes on purpose
    qx = QuantizedVector(x, "int8", dim=-1).quantize()
    qw = QuantizedVector(w, "int8", dim=0).quantize()
    assert qx.data is not None and qw.data is not None
    acc, backend = int8_matmul_int32(qx.data, qw.data)
    assert acc.dtype == torch.int32 and backend in ("_int_mm", "int32-matmul")
    exact = qx.data.double() @ qw.data.double()  # integers well below 2**53: float64 is exact
    assert torch.equal(acc.double(), exact)
    # and the dequantized int8 path is exactly the float64 product of the dequantized operands (up to fp32 rounding)
    y = mixed_precision_forward(x, w, threshold=float("inf"))
    ref = (qx.data.double() / qx.scale.double()) @ (qw.data.double() / qw.scale.double())
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_int32_fallback_matches_int_mm(monkeypatch):
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (20, 48), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 24), generator=g, dtype=torch.int8)
    fast, backend = int8_matmul_int32(a, b)
    assert backend in ("_int_mm", "int32-matmul")

    def unsupported(*args, **kwargs):
        raise RuntimeError("shape not supported")

    monkeypatch.setattr(torch, "_int_mm", unsupported)
    slow, fallback = int8_matmul_int32(a, b)
    assert fallback == "int32-matmul" and slow.dtype == torch.int32
    assert torch.equal(slow, fast) and torch.equal(slow.double(), a.double() @ b.double())
    with pytest.raises(LmshrinkError, match="int8 operands"):
        int8_matmul_int32(a.float(), b)


def test_threshold_inf_is_plain_int8():
    x, w, _ = planted(n_outliers=0)
    y, stats = mixed_precision_forward(x, w, threshold=float("inf"), return_stats=True)
    assert stats.n_outlier_columns == 0
    assert torch.equal(
        y, mixed_precision_forward(x, w, threshold=6.0)
    )  # no value above 6 in plain Gaussian x
    assert rel_err(x.double() @ w.double(), y.double()) < 0.02


def test_all_columns_outliers_is_fp16():
    x, w, _ = planted(tokens=8, d_in=32, d_out=16)
    y, stats = mixed_precision_forward(x, w, threshold=0.0, return_stats=True)
    assert stats.n_outlier_columns == 32 and stats.int_backend == "none"
    ref = x.half().float() @ w.half().float()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_layouts_and_batch_dims():
    x, w, _ = planted(tokens=12, d_in=64, d_out=24)
    y = mixed_precision_forward(x, w)
    linear = torch.nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w.t())
    assert torch.equal(mixed_precision_forward(x, linear.weight, weight_layout="out_in"), y)
    y3 = mixed_precision_forward(x.reshape(3, 4, 64), w)
    assert y3.shape == (3, 4, 24)
    assert torch.allclose(y3.reshape(12, 24), y, atol=1e-6)  # outliers are chosen over all tokens either way


def test_bad_inputs():
    x, w, _ = planted(tokens=4, d_in=16, d_out=8)
    with pytest.raises(LmshrinkError, match="shape mismatch"):
        mixed_precision_forward(x, w.t())
    with pytest.raises(LmshrinkError, match="weight_layout"):
        mixed_precision_forward(x, w, weight_layout="oi")  # type: ignore[arg-type]
    with pytest.raises(LmshrinkError, match="threshold"):
        mixed_precision_forward(x, w, threshold=-1.0)
    x[0, 0] = float("inf")
    with pytest.raises(NumericsError, match="activations"):
        mixed_precision_forward(x, w)
