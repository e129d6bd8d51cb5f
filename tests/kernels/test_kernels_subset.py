"""The kernels' Python is held to the subset NKI 0.3 compiles: each construct outside it is refused
with its rule (one test per rule), and the project's kernels pass."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from neuronmm_fx.kernels.standin import NkiRuleError, nisa, nl, run_kernel
from neuronmm_fx.kernels.standin.subset import ALLOWED_BUILTINS, check_kernel

BF16 = np.dtype(ml_dtypes.bfloat16)


def _copy_out(x):
    """A helper the kernels below call: returns an output written from ``x``."""
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=x)
    nisa.dma_copy(dst=y, src=tile)
    return y


def _refused(rule: str, kernel) -> str:
    with pytest.raises(NkiRuleError) as caught:
        run_kernel(kernel, np.ones((4, 4), np.float32))
    assert caught.value.rule == rule, str(caught.value)
    return str(caught.value)


def k_is(x):
    if x is None:
        return x
    return _copy_out(x)


def k_is_not(x, bias=None):
    if bias is not None:
        return x
    return _copy_out(x)


def k_raise(x):
    if x.shape[0] > 1000:
        raise ValueError("too many tokens")
    return _copy_out(x)


def k_zip(x):
    for _a, _b in zip(range(2), range(2), strict=True):
        pass
    return _copy_out(x)


def k_enumerate(x):
    for _i, _v in enumerate(range(2)):
        pass
    return _copy_out(x)


def k_any(x):
    if any([True]):
        return _copy_out(x)
    return x


def k_comprehension(x):
    sizes = [n * 2 for n in range(3)]
    return _copy_out(x) if sizes else x


def k_generator(x):
    return _copy_out(x) if max(n for n in range(3)) else x


def k_lambda(x):
    twice = lambda n: 2 * n  # noqa: E731 - the construct under test
    return _copy_out(x) if twice(1) else x


def k_nested_def(x):
    def twice(n):
        return 2 * n

    return _copy_out(x) if twice(1) else x


def k_try(x):
    try:
        return _copy_out(x)
    finally:
        pass


def k_with(x):
    with open("/dev/null"):
        return _copy_out(x)


def k_keyword_only(x, *, block=128):
    return _copy_out(x)


def k_varargs(x, *more):
    return _copy_out(x)


def k_global(x):
    global _COUNTER
    return _copy_out(x)


def k_yield(x):
    yield _copy_out(x)


def _helper_with_enumerate(n):
    total = 0
    for _i, value in enumerate(range(n)):
        total = total + value
    return total


def k_calls_a_bad_helper(x):
    return _copy_out(x) if _helper_with_enumerate(3) else x


@pytest.mark.parametrize(
    ("kernel", "rule", "words"),
    [
        (k_is, "subset-is", "is / is not are not compiled"),
        (k_is_not, "subset-is", "compare with == or !="),
        (k_raise, "subset-raise", "validate on the host"),
        (k_zip, "subset-builtin", "builtin zip()"),
        (k_enumerate, "subset-builtin", "builtin enumerate()"),
        (k_any, "subset-builtin", "builtin any()"),
        (k_comprehension, "subset-comprehension", "a list comprehension"),
        (k_generator, "subset-comprehension", "a generator expression"),
        (k_lambda, "subset-lambda", "lambda"),
        (k_nested_def, "subset-nested-def", "function twice is defined inside a kernel body"),
        (k_try, "subset-try", "try/except"),
        (k_with, "subset-with", "with nl.no_reorder()"),
        (k_keyword_only, "subset-signature", "keyword-only parameters"),
        (k_varargs, "subset-signature", "*args"),
        (k_global, "subset-global", "global"),
        (k_yield, "subset-yield", "generator"),
        (k_calls_a_bad_helper, "subset-builtin", "_helper_with_enumerate line"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_each_construct_outside_the_subset_is_refused_with_its_rule(kernel, rule, words):
    message = _refused(rule, kernel)
    assert words in message and "outside the Python subset NKI 0.3 compiles" in message


def test_the_allowed_builtins_and_statements_pass():
    def kernel(x):
        total = 0
        for n in range(len(x.shape)):
            total = total + int(min(n, 3)) + max(1, 2) + divmod(7, 2)[0]
        pieces = list((1, 2)) + [float(total)]
        label = str(tuple(pieces)) if isinstance(total, int) else ""
        count = 0
        while count < 2:
            count = count + 1
        assert count == 2, f"{label}"
        return _copy_out(x)

    assert check_kernel(kernel) == []
    out = run_kernel(kernel, np.arange(16, dtype=np.float32).reshape(4, 4)).outputs
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.float32).reshape(4, 4))
    assert {"range", "len", "min", "max", "isinstance"} <= ALLOWED_BUILTINS
    assert not {"zip", "enumerate", "any", "all", "sum", "getattr"} & ALLOWED_BUILTINS


def test_the_project_kernels_are_inside_the_subset():
    from neuronmm_fx.kernels.mlp import svd_mlp_fused
    from neuronmm_fx.kernels.xuv import matmul_dense, xuv_fused, xuv_unfused

    for kernel in (xuv_fused, xuv_unfused, matmul_dense, svd_mlp_fused):
        assert check_kernel(kernel) == [], kernel.__name__


def test_a_kernel_without_readable_source_is_refused_not_skipped():
    namespace: dict = {}
    exec("def kernel(x):\n    return x\n", namespace)  # no file, no linecache entry
    _refused("subset-source", namespace["kernel"])


def test_two_psum_inputs_to_one_vector_instruction_are_refused():
    def kernel(x):
        first = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        second = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(first, 1.0)
        nisa.memset(second, 2.0)
        nisa.tensor_tensor(dst=out, data1=first, data2=second, op=nl.add)
        return x

    message = _refused("psum-operands", kernel)
    assert "data1 and data2 are both in PSUM" in message


def test_a_casting_dma_on_the_hardware_dge_is_refused():
    def kernel(x, mode):
        tile = nl.ndarray((4, 4), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.dma_copy(dst=tile, src=x, dge_mode=mode)
        y = nl.ndarray((4, 4), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=y, src=tile)
        return y

    with pytest.raises(NkiRuleError) as caught:
        run_kernel(kernel, np.ones((4, 4), np.float32), "hwdge")
    assert caught.value.rule == "dma-cast" and "float32 -> bfloat16 with dge_mode='hwdge'" in str(
        caught.value
    )
    out = run_kernel(kernel, np.full((4, 4), 1.5, np.float32), "swdge").outputs  # the software DGE casts
    np.testing.assert_array_equal(out.astype(np.float32), np.full((4, 4), 1.5, np.float32))


def test_targets_state_their_dialect_usable_sbuf_and_the_launch_grid():
    from neuronmm_fx.kernels.targets import COMPILER_RESERVED_SBUF, TARGETS
    from neuronmm_fx.kernels.xuv import xuv_fused

    assert sorted(TARGETS) == ["trn1", "trn2", "trn3"]
    assert [t.runs_current_nki for t in TARGETS.values()] == [False, True, True]  # trn1: legacy dialect
    assert TARGETS["trn3"].sbuf_partition_bytes == 256 * 1024 and TARGETS["trn3"].core == "NeuronCore-v4"
    for target in TARGETS.values():
        assert target.usable_sbuf_partition_bytes == target.sbuf_partition_bytes - COMPILER_RESERVED_SBUF
    assert xuv_fused[1] is xuv_fused
    with pytest.raises(NkiRuleError) as caught:
        xuv_fused[2]
    assert caught.value.rule == "lnc" and "written for one core" in str(caught.value)


def test_sbuf_capacity_is_the_usable_share_not_the_physical_one():
    from neuronmm_fx.kernels.targets import TARGETS

    usable = TARGETS["trn2"].usable_sbuf_partition_bytes

    def kernel(x, extra):
        tile = nl.ndarray((128, (usable + extra) // 2), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.memset(tile, 0.0)
        return _copy_out(x)

    with pytest.raises(NkiRuleError) as caught:  # fits the 224 KiB, not what the compiler leaves
        run_kernel(kernel, np.ones((1, 1), np.float32), 2)
    assert caught.value.rule == "sbuf-capacity" and "207.5 KiB a kernel may use of the 224 KiB" in str(
        caught.value
    )


def _transposing(shape, dtype, use_dma: bool, dst_buffer=None, dst_dtype=None):
    def kernel(x):
        rows, cols = shape
        tile = nl.ndarray((cols, rows), dtype=dst_dtype or x.dtype, buffer=dst_buffer or nl.sbuf)
        if use_dma:
            nisa.dma_transpose(dst=tile, src=x[0:rows, 0:cols])
        else:
            staged = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=staged, src=x[0:rows, 0:cols])
            nisa.nc_transpose(dst=tile, data=staged)
        out = nl.ndarray((cols, rows), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out, src=tile)
        y = nl.ndarray((cols, rows), dtype=x.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=y, src=out)
        return y

    return kernel


@pytest.mark.parametrize(
    ("shape", "dtype"), [((16, 128), np.float32), ((32, 128), BF16), ((16, 64), BF16), ((128, 128), BF16)]
)
def test_dma_transposes_outside_the_hardware_dge_shape_are_refused(shape, dtype):
    with pytest.raises(NkiRuleError) as caught:
        run_kernel(_transposing(shape, dtype, use_dma=True), np.ones(shape, dtype))
    assert caught.value.rule == "dma-transpose-dge" and "(16, 128)" in str(caught.value)


def test_the_hardware_dge_shape_and_the_tensor_engine_transpose_are_exact():
    x = (np.arange(16 * 128) % 251).astype(BF16).reshape(16, 128)
    for use_dma in (True, False):
        out = run_kernel(_transposing((16, 128), BF16, use_dma, nl.psum if not use_dma else None), x).outputs
        np.testing.assert_array_equal(out, x.T)
    wide = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)  # any dtype, up to 128 x 128
    run = run_kernel(_transposing((100, 120), np.float32, False, nl.psum), wide)
    np.testing.assert_array_equal(run.outputs, wide.T)
    assert run.stats.tensor_cycles == max(min(64, 120), 100) * 4  # one fp32 matmul against an identity


@pytest.mark.parametrize(
    ("dst_buffer", "dst_dtype", "shape", "rule"),
    [
        (None, None, (64, 64), "transpose-buffers"),  # TensorE writes PSUM
        ("psum", np.float32, (64, 64), "transpose-dtype"),  # the result keeps the input's dtype
        ("psum", None, (64, 129), "partition-dim"),  # 129 columns become 129 partitions
    ],
)
def test_tensor_engine_transposes_break_their_rules(dst_buffer, dst_dtype, shape, rule):
    buffer = nl.psum if dst_buffer == "psum" else None
    kernel = _transposing(shape, BF16, False, buffer, dst_dtype)
    with pytest.raises(NkiRuleError) as caught:
        run_kernel(kernel, np.ones(shape, BF16))
    assert caught.value.rule == rule, str(caught.value)
