"""The CPU stand-in for NKI is strict: each hardware/compiler rule broken by a tiny kernel is an error
that names the rule."""

from __future__ import annotations

import importlib
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from neuronmm_fx.kernels import standin
from neuronmm_fx.kernels.standin import NkiRuleError, TensorSpec, nisa, nl, run_kernel

BF16 = ml_dtypes.bfloat16


def _raises(rule: str, kernel, *args, **kwargs) -> NkiRuleError:
    with pytest.raises(NkiRuleError) as exc:
        run_kernel(kernel, *args, **kwargs)
    assert exc.value.rule == rule, str(exc.value)
    assert str(exc.value).startswith(f"[{rule}]")
    return exc.value


def _matmul_kernel(stat_shape, mov_shape, dst_shape, dst_buffer=None, dst_dtype=None, op_buffer=None):
    def kernel(x):
        st = nl.ndarray(stat_shape, dtype=nl.bfloat16, buffer=op_buffer or nl.sbuf)
        mv = nl.ndarray(mov_shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(st, 1.0)
        nisa.memset(mv, 1.0)
        ps = nl.ndarray(dst_shape, dtype=dst_dtype or nl.float32, buffer=dst_buffer or nl.psum)
        nisa.nc_matmul(ps, stationary=st, moving=mv)
        return x

    return kernel


def test_256_partition_tile_is_rejected():
    def kernel(x):
        nl.ndarray((256, 64), dtype=nl.bfloat16, buffer=nl.sbuf)
        return x

    err = _raises("partition-dim", kernel, np.zeros((2, 2), np.float32))
    assert "256 partitions" in str(err) and "at most 128" in str(err)


def test_1024_wide_moving_operand_is_rejected():
    k = _matmul_kernel((128, 128), (128, 1024), (128, 512))
    err = _raises("matmul-moving-free", k, np.zeros((2, 2), np.float32))
    assert "moving free size 1024 exceeds 512" in str(err)


def test_moving_free_rule_also_in_shape_only_mode():
    k = _matmul_kernel((128, 128), (128, 1024), (128, 512))
    _raises("matmul-moving-free", k, TensorSpec((2, 2), "float32"), shape_only=True)


def test_stationary_free_over_128_is_rejected():
    k = _matmul_kernel((128, 256), (128, 512), (128, 512))
    err = _raises("matmul-stationary-free", k, np.zeros((2, 2), np.float32))
    assert "stationary free size 256 exceeds 128" in str(err)


def test_contraction_must_be_on_partitions_of_both_operands():
    k = _matmul_kernel((128, 64), (64, 512), (64, 512))
    err = _raises("matmul-contraction", k, np.zeros((2, 2), np.float32))
    assert "128" in str(err) and "64" in str(err)


def test_fp32_matmul_written_to_sbuf_is_rejected():
    k = _matmul_kernel((128, 128), (128, 512), (128, 512), dst_buffer=nl.sbuf)
    err = _raises("matmul-dst-psum", k, np.zeros((2, 2), np.float32))
    assert "TensorE writes PSUM" in str(err)


def test_bf16_matmul_result_tile_is_rejected():
    k = _matmul_kernel((128, 128), (128, 512), (128, 512), dst_dtype=nl.bfloat16)
    _raises("matmul-dst-fp32", k, np.zeros((2, 2), np.float32))


def test_matmul_operand_in_psum_is_rejected():
    def kernel(x):
        st = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.psum)
        mv = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf)
        ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, stationary=st, moving=mv)
        return x

    _raises("matmul-operands-sbuf", kernel, np.zeros((2, 2), np.float32))


def test_sbuf_overflow_is_rejected_on_trn1_but_not_trn2():
    def kernel(x):
        live = [nl.ndarray((128, 100 * 1024 // 2), dtype=nl.bfloat16, buffer=nl.sbuf)]  # 100 KiB / partition
        live.append(nl.ndarray((128, 100 * 1024 // 2), dtype=nl.bfloat16, buffer=nl.sbuf))  # 200 KiB live
        return x

    err = _raises("sbuf-capacity", kernel, np.zeros((2, 2), np.float32), target="trn1")
    assert "192 KiB" in str(err)
    run_kernel(kernel, np.zeros((2, 2), np.float32), target="trn2")  # 224 KiB per partition fits


def test_sbuf_is_released_when_a_buffer_dies():
    def helper():
        t = nl.ndarray((128, 120 * 1024 // 2), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(t, 0.0)

    def kernel(x):
        helper()
        helper()  # the first 120 KiB buffer is dead by now
        return x

    res = run_kernel(kernel, np.zeros((2, 2), np.float32), target="trn1")
    assert res.stats.peak_sbuf_bytes == 120 * 1024


def test_more_than_8_psum_banks_is_rejected():
    def kernel(x):
        a = nl.ndarray((128, 6, 512), dtype=nl.float32, buffer=nl.psum)
        b = nl.ndarray((128, 3, 512), dtype=nl.float32, buffer=nl.psum)
        return x, a, b

    err = _raises("psum-capacity", kernel, np.zeros((2, 2), np.float32))
    assert "9 banks" in str(err)


def test_psum_row_wider_than_a_bank_is_rejected():
    def kernel(x):
        nl.ndarray((128, 1024), dtype=nl.float32, buffer=nl.psum)
        return x

    _raises("psum-bank", kernel, np.zeros((2, 2), np.float32))


def test_reading_an_unwritten_buffer_is_rejected():
    def kernel(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        y = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=y, src=t)
        return y

    err = _raises("uninitialized-read", kernel, np.zeros((2, 2), np.float32))
    assert "32 of 32 elements" in str(err)


def test_reading_a_partly_written_buffer_is_rejected():
    def kernel(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:4, 0:6], src=x[0:4, 0:6])
        y = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=y, src=t)
        return y

    err = _raises("uninitialized-read", kernel, np.ones((4, 8), np.float32))
    assert "8 of 32 elements" in str(err)


def test_accumulating_into_fresh_psum_is_an_uninitialized_read():
    def kernel(x):
        st = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
        mv = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(st, 1.0)
        nisa.memset(mv, 1.0)
        ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, stationary=st, moving=mv, accumulate=True)
        return x

    _raises("uninitialized-read", kernel, np.zeros((2, 2), np.float32))


def test_new_on_chip_buffers_are_nan_filled():
    seen = {}

    def kernel(x):
        t = nl.ndarray((8, 16), dtype=nl.bfloat16, buffer=nl.sbuf)
        p = nl.ndarray((8, 16), dtype=nl.float32, buffer=nl.psum)
        seen["sbuf"] = np.isnan(t._a.data.astype(np.float32)).all()
        seen["psum"] = np.isnan(p._a.data).all()
        return x

    run_kernel(kernel, np.zeros((2, 2), np.float32))
    assert seen == {"sbuf": True, "psum": True}


def test_output_with_unwritten_elements_is_rejected():
    def kernel(x):
        y = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=y[0:3, 0:8], src=x[0:3, 0:8])
        return y

    _raises("output-unwritten", kernel, np.ones((4, 8), np.float32))


def test_dma_into_psum_and_engines_on_hbm_are_rejected():
    def dma_psum(x):
        p = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.dma_copy(dst=p, src=x)
        return x

    def engine_hbm(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t, src=x)
        return x

    _raises("dma-buffer", dma_psum, np.ones((4, 8), np.float32))
    _raises("engine-buffer", engine_hbm, np.ones((4, 8), np.float32))


def test_out_of_bounds_and_partition_indexing_are_rejected():
    def oob(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[0:4, 0:9], src=x)
        return x

    def drop_partition(x):
        t = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        return t[0]

    _raises("index", oob, np.ones((4, 9), np.float32))
    _raises("index", drop_partition, np.ones((4, 8), np.float32))


def test_elementwise_layout_mismatch_is_rejected():
    def kernel(x):
        a = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        b = nl.ndarray((8, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(b, 0.0)
        nisa.tensor_copy(dst=a, src=b)
        return x

    _raises("elementwise-shape", kernel, np.ones((2, 2), np.float32))


def test_operators_are_checked_for_their_instruction():
    def activation_as_alu(x):
        a = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(a, 1.0)
        nisa.tensor_tensor(dst=a, data1=a, data2=a, op=nl.silu)
        return x

    def alu_as_activation(x):
        a = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(a, 1.0)
        nisa.activation(dst=a, op=nl.add, data=a)
        return x

    assert "unsupported operator nl.silu" in str(
        _raises("elementwise-shape", activation_as_alu, np.zeros((2, 2), np.float32))
    )
    assert "unsupported activation nl.add" in str(
        _raises("elementwise-shape", alu_as_activation, np.zeros((2, 2), np.float32))
    )


def test_nki_calls_outside_a_kernel_are_rejected():
    with pytest.raises(NkiRuleError) as exc:
        nl.ndarray((4, 4), dtype=nl.float32)
    assert exc.value.rule == "no-kernel"


def test_counters_of_a_single_matmul():
    def kernel(x):
        st = nl.ndarray((128, 128), dtype=nl.bfloat16, buffer=nl.sbuf)
        mv = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=st, src=x[0:128, 0:128])
        nisa.dma_copy(dst=mv, src=x[0:128, 0:512])
        ps = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, stationary=st, moving=mv)
        part = nl.ndarray((32, 40), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(part, stationary=st[0:128, 0:32], moving=mv[0:128, 0:40])  # a partial tile
        y = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        ob = nl.ndarray((128, 512), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=ob, src=ps)
        nisa.dma_copy(dst=y, src=ob)
        return y

    s = run_kernel(kernel, np.ones((128, 512), BF16), target="trn1").stats
    assert s.hbm_read_bytes == 2 * (128 * 128 + 128 * 512)
    assert s.hbm_write_bytes == 2 * 128 * 512
    assert s.matmul_count == 2
    assert s.tensor_cycles == 512 + 40  # max(min(64, 128), 512) + max(min(64, 32), 40)
    assert s.peak_sbuf_bytes == 2 * (128 + 512 + 512)
    assert s.peak_psum_banks == 2
    assert s.tensor_time_s == pytest.approx(552 / 2.8e9)
    assert "model, not a measurement" in s.summary()


def test_real_nki_is_preferred_when_importable(monkeypatch):
    """The stand-in is chosen only when ``import nki`` fails (it does on this machine)."""
    from neuronmm_fx.kernels import _nki

    assert _nki.USING_STANDIN and _nki.nki is standin.nki
    fake = types.ModuleType("nki")
    fake_isa = types.ModuleType("nki.isa")
    fake_lang = types.ModuleType("nki.language")
    fake.jit = lambda f: f
    fake_isa.nc_matmul = lambda *a, **k: None
    fake_lang.ndarray = lambda *a, **k: None
    fake.isa, fake.language = fake_isa, fake_lang
    monkeypatch.setitem(sys.modules, "nki", fake)
    monkeypatch.setitem(sys.modules, "nki.isa", fake_isa)
    monkeypatch.setitem(sys.modules, "nki.language", fake_lang)
    try:
        reloaded = importlib.reload(_nki)
        assert not reloaded.USING_STANDIN and reloaded.nki is fake and reloaded.nisa is fake_isa
    finally:
        monkeypatch.undo()
        importlib.reload(_nki)
    assert _nki.USING_STANDIN
