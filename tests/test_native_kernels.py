"""levante.kernels.native: the W8A8 / W4A8 kernels of kernels/cpu/ against float64 references.

The kernels round each row of x to int8 in blocks of 32 (scale = the block's max / 127),
so a product differs from the exact one (same quantised weights, float64) by the
activation rounding: per value at most half a step, ~0.3% of the block's max RMS. On
Gaussian data this is ~0.5% of the output's norm (measured 0.4-0.6%), bf16 activations and
outputs add ~0.3%: the tolerance is 1% relative (Frobenius), and each element stays
within a bound derived from the rounding (|w| . step / 2, summed over the row).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernel_variants import kernel_variant  # noqa: F401
from levante.kernels import build, isa, native
from levante.quant.packed import Int4Weight, Int8Weight, Q5Weight, int4_supported, quantize_int4, quantize_int8

every_variant = pytest.mark.usefixtures("kernel_variant")  # each variant this CPU runs (kernel_variants.py)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per output, the most the int8 rounding of x (blocks of 32) can move ``x @ w.T``."""
    k = x.shape[1]
    padded = torch.nn.functional.pad(x.double(), (0, -k % 32))
    step = padded.view(x.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
    half_step = step.expand(-1, -1, 32).reshape(x.shape[0], -1)[:, :k] / 2
    return half_step @ w.double().abs().t()


@every_variant
@pytest.mark.parametrize("shape", [(16, 32), (37, 50), (100, 96), (1152, 896), (40, 4864)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_against_float64(shape, rows, dtype):
    """N not a multiple of the 16-row tile, K not a multiple of the 32-value block, M = 1..11
    (more than 8 rows go in two calls)."""
    generator = torch.Generator().manual_seed(rows * 1000 + shape[0])
    w = torch.randn(*shape, generator=generator)
    weight = quantize_int8(w, dtype)
    assert weight.layout == "t16" and weight.shape == shape
    x = torch.randn(rows, shape[1], generator=generator).to(dtype)
    w_hat = weight.dequantize(torch.float64)
    want = x.double() @ w_hat.t()
    got = native.int8_matmul(weight.qweight, weight._scales32, weight.shape, x)
    assert got.dtype == dtype and got.shape == (rows, shape[0])
    assert relative_error(got, want) < 0.01
    slack = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((got.double() - want).abs() <= rounding_bound(x, w_hat) * 1.01 + slack * want.abs() + 1e-4).all()


@every_variant
@pytest.mark.parametrize("shape", [(16, 32), (40, 96), (144, 896), (24, 4864)])
@pytest.mark.parametrize("rows", [1, 3, 8, 10])
def test_int4_kernel_against_float64(shape, rows):
    generator = torch.Generator().manual_seed(rows * 1000 + shape[0])
    w = torch.randn(*shape, generator=generator)
    weight = quantize_int4(w, 32, torch.float32) if shape[0] % 16 == 0 else None
    if weight is None:  # the int4 path takes rows % 16 == 0 (quantize_int4's rule): go through the parts
        codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=generator)
        scale = torch.rand(shape[0], shape[1] // 32, generator=generator)
        offset = torch.randn(shape[0], shape[1] // 32, generator=generator)
        weight = Int4Weight.from_parts([(codes, scale, offset)], shape, torch.float32)
    assert weight.layout == "q4t16"
    x = torch.randn(rows, shape[1], generator=generator)
    w_hat = weight.dequantize(torch.float64)
    want = x.double() @ w_hat.t()
    got = weight.matmul(x)
    assert relative_error(got, want) < 0.01
    assert ((got.double() - want).abs() <= rounding_bound(x, w_hat) * 1.01 + 1e-5 * want.abs() + 1e-4).all()


@every_variant
def test_int4_rows_not_a_multiple_of_the_tile():
    shape = (40, 64)
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=generator)
    scale, offset = torch.rand(40, 2, generator=generator), torch.randn(40, 2, generator=generator)
    weight = Int4Weight.from_parts([(codes[:24], scale[:24], offset[:24]), (codes[24:], scale[24:], offset[24:])],
                                   shape, torch.float32)
    want = (codes.float().view(40, 2, 32) * scale[..., None] + offset[..., None]).view(shape)
    assert torch.equal(weight.dequantize(torch.float32), want)
    index = torch.tensor([39, 0, 17])
    assert torch.equal(weight.rows(index, torch.float32), want[index])
    x = torch.randn(2, 64, generator=generator)
    exact = x.double() @ want.double().t()
    got = weight.matmul(x)
    assert relative_error(got, exact) < 0.01
    assert ((got.double() - exact).abs() <= rounding_bound(x, want) * 1.01 + 1e-5 * exact.abs() + 1e-4).all()


@every_variant
@pytest.mark.parametrize("shape", [(37, 50), (144, 64)])
def test_int8_layouts_round_trip(shape):
    weight = quantize_int8(torch.randn(*shape, generator=torch.Generator().manual_seed(6)))
    rows = weight.in_layout("rows")
    assert rows.layout == "rows" and rows.qweight.shape == shape
    assert torch.equal(native._pack_int8_torch(rows.qweight), weight.qweight)  # C packing = PyTorch's
    assert torch.equal(rows.in_layout("t16").qweight, weight.qweight)
    assert torch.equal(rows.dequantize(torch.float32), weight.dequantize(torch.float32))
    index = torch.tensor([[shape[0] - 1, 0], [17, 16]])
    assert torch.equal(weight.rows(index, torch.float32), rows.rows(index, torch.float32))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(native.unpack_int8_rows(weight.qweight, shape, 16, shape[0], dtype),
                           rows.qweight[16:].to(dtype))
    x = torch.randn(20, shape[1])  # the dense path, through each layout's rows, where this variant has one
    if weight.dense_from_rows <= 20:
        assert relative_error(weight.matmul(x), rows.matmul(x)) < 1e-6


@every_variant
@pytest.mark.skipif(not int4_supported(), reason="PyTorch's int4 packing (the aten layout) differs on this CPU")
def test_int4_layouts_round_trip():
    """Equal up to float32 rounding: the aten layout keeps zero = offset + 8 * scale."""
    weight = quantize_int4(torch.randn(144, 64, generator=torch.Generator().manual_seed(5)), 32, torch.float32)
    want = weight.dequantize(torch.float32)
    aten = weight.in_layout("aten")
    assert aten.layout == "aten"
    torch.testing.assert_close(aten.dequantize(torch.float32), want, rtol=0, atol=1e-6)
    back = aten.in_layout("q4t16")
    torch.testing.assert_close(back.dequantize(torch.float32), want, rtol=0, atol=1e-6)
    x = torch.randn(90, 64)  # the dense path of each layout
    assert relative_error(weight.matmul(x), aten.matmul(x)) < 1e-6


@every_variant
def test_threads_agree():
    weight = quantize_int8(torch.randn(4096, 256))
    x = torch.randn(3, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight.matmul(x)
        torch.set_num_threads(2)
        two = weight.matmul(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@every_variant
def test_rows_agree_however_many_share_a_call():
    """A row of x gets the same bits alone as among 11 (variants take many rows another way)."""
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(11, 896, generator=generator)
    int8 = quantize_int8(torch.randn(100, 896, generator=generator))
    codes, d, _ = q5_codes((100, 896), 3)
    q5 = Q5Weight.from_codes(codes, d)
    q4 = quantize_int4(torch.randn(96, 896, generator=generator), 32, torch.float32)
    products = [lambda rows: native.int8_matmul(int8.qweight, int8._scales32, int8.shape, rows, precise=False),
                lambda rows: native.q5_matmul(q5.packed, q5.shape, rows),
                lambda rows: native.int4_matmul(q4.packed, q4.qscale, q4.qoffset, q4.shape, rows)]
    for product in products:
        together = product(x)
        assert torch.equal(together, torch.cat([product(x[i:i + 1]) for i in range(11)]))


def test_disabled_by_env_falls_back_to_pytorch():
    """LEVANTE_NATIVE_KERNELS=0: no library, packed weights in PyTorch's layouts, exact kernels."""
    code = (
        "import torch\n"
        "from levante.kernels import native\n"
        "from levante.quant.packed import quantize_int8\n"
        "assert native.library() is None\n"
        "w = quantize_int8(torch.randn(40, 64))\n"
        "assert w.layout == 'rows'\n"
        "x = torch.randn(2, 64)\n"
        "want = x @ w.dequantize(torch.float32).t()\n"
        "err = (w.matmul(x) - want).norm() / want.norm()\n"
        "assert err < 1e-5, err\n"
        "print('ok')\n"
    )
    env = {**os.environ, "LEVANTE_NATIVE_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_build_failure_is_quiet(tmp_path, monkeypatch):
    """No packaged library and a compiler that fails: no kernels (debug log only), nothing raised."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "PACKAGED", tmp_path / "none")
    name = isa.for_machine()[0].name if isa.for_machine() else pytest.skip(f"no kernel variant for {isa.machine()}")
    native._load.cache_clear()
    try:
        assert native._load(name) is None
        with pytest.raises(subprocess.CalledProcessError):
            build.library_path(name)
    finally:
        native._load.cache_clear()


@pytest.mark.slow
def test_built_at_first_use_where_not_installed(tmp_path, monkeypatch, caplog):
    """A variant missing from the package is compiled into the cache once, and that is logged once."""
    name = isa.best()
    if name == isa.SCALAR or build.compiler() is None:
        pytest.skip(f"no kernel variant runs here ({isa.machine()}) or no C compiler")
    monkeypatch.setenv("LEVANTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "PACKAGED", tmp_path / "none")
    monkeypatch.setattr(build, "_logged_fallback", set())
    with caplog.at_level("INFO", logger="levante"):
        first, again = build.library_path(name), build.library_path(name)
    assert first == again and first.parent == tmp_path / "cache" / "kernels" and build.is_current(first, isa.VARIANTS[name])
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert f"the {name} variant is not installed" in caplog.records[0].getMessage()


def test_the_package_carries_every_variant_of_this_architecture():
    """make install / pip install built every variant into levante/kernels/lib, from these sources."""
    if not isa.for_machine() or build.compiler() is None:
        pytest.skip(f"no kernel variant for {isa.machine()}, or no C compiler to have built them")
    for variant in isa.for_machine():
        assert build.is_current(build.PACKAGED / build.file_name(variant.name), variant), variant.name


def test_cpu_isa_choice(monkeypatch):
    """LEVANTE_CPU_ISA: the best by default, "scalar" is PyTorch's kernels, a variant this CPU cannot run
    (another architecture's always exists) and an unknown name are refused, saying why."""
    monkeypatch.delenv("LEVANTE_CPU_ISA", raising=False)
    monkeypatch.delenv("LEVANTE_NATIVE_KERNELS", raising=False)
    assert isa.requested() == isa.best()
    monkeypatch.setenv("LEVANTE_CPU_ISA", "scalar")
    assert isa.requested() == "scalar"
    foreign = next(name for name in isa.VARIANTS if isa.missing(name) is not None)
    monkeypatch.setenv("LEVANTE_CPU_ISA", foreign)
    with pytest.raises(isa.KernelChoiceError, match=f"LEVANTE_CPU_ISA={foreign}: .*this CPU runs {isa.best()}"):
        isa.requested()
    monkeypatch.setenv("LEVANTE_CPU_ISA", "sse2")
    with pytest.raises(isa.KernelChoiceError, match="no such kernel variant"):
        isa.requested()
    monkeypatch.setenv("LEVANTE_NATIVE_KERNELS", "0")
    assert isa.requested() == "scalar"


def test_forcing_a_lower_variant_runs_it():
    """LEVANTE_CPU_ISA=<the lowest variant this CPU runs> in a fresh process: that variant's kernels."""
    runnable = [v.name for v in isa.for_machine() if isa.missing(v.name) is None]
    if not runnable:
        pytest.skip(f"no kernel variant runs on this CPU ({isa.machine()})")
    code = "from levante.kernels import native; print(native.variant())"
    for name in (runnable[-1], "scalar"):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LEVANTE_CPU_ISA": name},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == name, result.stderr[-2000:]


def q5_codes(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 32, shape, dtype=torch.uint8, generator=generator)
    d = (torch.rand(shape[0], shape[1] // 32, generator=generator) * 0.02).half()
    values = ((codes.float() - 16).view(shape[0], -1, 32) * d.float().unsqueeze(2)).view(shape)
    return codes, d, values


@every_variant
@pytest.mark.parametrize("shape", [(16, 32), (37, 96), (1152, 896)])
@pytest.mark.parametrize("rows", [1, 4, 8, 11])
def test_q5_kernel_against_float64(shape, rows):
    codes, d, values = q5_codes(shape, rows)
    weight = Q5Weight.from_codes(codes, d)
    assert torch.equal(weight.dequantize(torch.float32), values)  # exact: the stored Q5_0 values
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(7))
    want = x.double() @ values.double().t()
    got = weight.matmul(x)
    assert relative_error(got, want) < 0.01
    assert ((got.double() - want).abs() <= rounding_bound(x, values) * 1.01 + 1e-5 * want.abs() + 1e-4).all()


@every_variant
def test_q5_layout_round_trips_and_rows():
    codes, d, values = q5_codes((37, 64), 1)
    weight = Q5Weight.from_codes(codes, d)
    back_codes, back_d = native.unpack_q5(weight.packed, weight.shape)
    assert torch.equal(back_codes, codes) and torch.equal(back_d, d)
    index = torch.tensor([[36, 0], [17, 16]])
    assert torch.equal(weight.rows(index, torch.float32), values[index])
    assert torch.equal(native.q5_values(weight.packed, weight.shape, 16, 37, torch.bfloat16), values[16:].bfloat16())
    x = torch.randn(30, 64)  # the dense path, where this variant has one
    if weight.dense_from_rows <= 30:
        assert relative_error(weight.matmul(x), x.double() @ values.double().t()) < 1e-6
    int8 = weight.to_int8(torch.float32)
    assert relative_error(int8.dequantize(torch.float32), values) < 0.01


@every_variant
def test_q5_0_gguf_tensors_stay_exact():
    from gguf import GGMLQuantizationType as T
    import gguf
    import numpy as np

    from levante.quant.gguf_blocks import GGUFTensor
    from levante.quant.packed import pack

    values = torch.randn(48, 128, generator=torch.Generator().manual_seed(2)).numpy()
    raw = gguf.quants.quantize(values, T.Q5_0)
    tensor = GGUFTensor(T.Q5_0, torch.from_numpy(np.ascontiguousarray(raw)), (48, 128))
    weight = pack([tensor], "auto", torch.float32)
    assert isinstance(weight, Q5Weight)
    assert torch.equal(weight.dequantize(torch.float32), tensor.dequantize())
    q8 = GGUFTensor(T.Q8_0, torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(values, T.Q8_0))), (48, 128))
    mixed = pack([tensor, q8], "auto", torch.float32)
    assert isinstance(mixed, Int8Weight)  # Q5_0 with Q8_0 shards: int8 for both
