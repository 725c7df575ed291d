"""runtime/ce_rows.py: the Triton row kernels of the fused LM head + CE (run in the interpreter on CPU).

Specification: with ``UNSLOTH_FX_LCE_KERNEL=triton`` the op computes the same loss and gradients as its torch
path (up to summation order and one rounding), allocates no fp32 ``[chunk, vocab]`` buffer, and
``workspace_bytes`` counts exactly that difference; unset or ``torch``, nothing changes.
"""

import pytest
import torch

from unsloth_fx.runtime import ce_rows
from unsloth_fx.runtime import linear_cross_entropy as lce

from _support import PeakAllocations

OP = torch.ops.unsloth_fx.linear_cross_entropy.default

pytestmark = pytest.mark.skipif(not ce_rows.HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv(ce_rows.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ce_rows.wanted(torch.empty(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_against_fp64(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    rows, V = 6, 5000  # V is not a multiple of the 4096-wide block: the tail is masked
    x = (torch.randn(rows, V, generator=g) * 4).to(dtype)
    x[3] = float("-inf")  # a row of -inf: lse -inf, as torch.logsumexp (shift by 0)
    t = torch.randint(0, V, (rows,), generator=g)
    k = torch.tensor([0.5, 0.0, 0.25, 0.0, 1.0, 0.125])  # 0: an ignored token
    lse = torch.empty(rows)
    m, s = ce_rows.row_stats(x, lse)
    ref = torch.logsumexp(x.double(), 1)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(lse[fin].double(), ref[fin], rtol=0, atol=1e-5)
    assert lse[3].item() == float("-inf") and m[3].item() == 0.0 and s[3].item() == 0.0
    torch.testing.assert_close(m.double(), torch.where(fin, x.double().amax(1), 0.0))
    x_in = x.clone()
    out = ce_rows.row_grad_(x, t, m, s, k)
    assert out.data_ptr() == x.data_ptr() and out.dtype == dtype  # in place
    p = torch.softmax(x_in.double(), 1)
    want = (p - torch.nn.functional.one_hot(t, V).double()) * k.double()[:, None]
    keep = [i for i in range(rows) if i != 3]
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8  # one rounding to the logits' dtype
    torch.testing.assert_close(out[keep].double(), want[keep], rtol=tol, atol=tol * 1e-3)


def _inputs(T, H, V, dtype, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fp32", "weight_dtype"])
@pytest.mark.parametrize("T,V,chunks,reduction", [(96, 700, 4, "mean"), (37, 300, 8, "sum"), (5, 4500, 2, "mean")])
def test_op_matches_its_torch_path(monkeypatch, dtype, mode, T, V, chunks, reduction):
    h, w, y = _inputs(T, 16, V, dtype)
    monkeypatch.setenv(ce_rows.ENV, "torch")
    ref = OP(h, w, y, -100, chunks, 0, reduction, True, mode)
    monkeypatch.setenv(ce_rows.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = OP(h, w, y, -100, chunks, 0, reduction, True, mode)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    # grad_hidden / grad_weight: the gradient logits differ by one rounding in the weight dtype at most
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[1], ref[1], **tol)
    torch.testing.assert_close(got[2], ref[2], **tol)


def test_all_ignored_gives_the_torch_paths_nan_and_zero_gradients(kernel):
    h, w, y = _inputs(16, 8, 50, torch.bfloat16)
    y[:] = -100
    loss, gh, gw = OP(h, w, y, -100, 4, 0, "mean", True, "weight_dtype")
    assert torch.isnan(loss) and not gh.any() and not gw.any()


def _peak(T, H, V, chunks, dtype):
    h, w, y = _inputs(T, H, V, dtype)
    tr = PeakAllocations()
    with torch.no_grad(), tr:
        out = lce._forward_impl(h, w, y, -100, chunks, 0, "mean", True, "weight_dtype")
    del out
    return tr


@pytest.mark.parametrize("on", [True, False])
def test_no_fp32_chunk_buffer_and_workspace_bytes_counts_the_difference(monkeypatch, on):
    T, H, V, chunks = 256, 16, 3000, 8
    c = T // chunks
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ce_rows.ENV, "triton" if on else "torch")
    launch = ce_rows._launch

    def unseen(*a, **k):
        # The interpreter copies the kernels' arguments and keeps them in reference cycles past the launch; a GPU
        # launch allocates nothing and keeps nothing
        import gc

        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            launch(*a, **k)
        gc.collect()

    monkeypatch.setattr(ce_rows, "_launch", unseen)
    tr = _peak(T, H, V, chunks, torch.bfloat16)
    # the torch path (the negative control) makes one fp32 [c, V] buffer per chunk; the kernels none
    assert tr.fp32_shapes.count((c, V)) == (0 if on else chunks), tr.fp32_shapes
    predicted = lce.workspace_bytes(T, V, H, torch.bfloat16, chunks, 0, True, "weight_dtype")
    assert tr.peak <= predicted <= tr.peak + 16 * T + 4096, (tr.peak, predicted)
    both = [lce.workspace_bytes(T, V, H, torch.bfloat16, chunks, 0, True, "weight_dtype", rows_kernel=r)
            for r in (False, True)]
    assert both[0] - both[1] == c * V * 4 - 2 * 512  # the fp32 buffer, less the two fp32 [c] statistics
    assert predicted == both[1 if on else 0]  # None follows the switch


def test_switch(monkeypatch):
    monkeypatch.setenv(ce_rows.ENV, "cuda")
    with pytest.raises(ValueError, match="UNSLOTH_FX_LCE_KERNEL='cuda'"):
        ce_rows.requested()
    monkeypatch.delenv(ce_rows.ENV)
    assert not ce_rows.requested()
    monkeypatch.setenv(ce_rows.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ce_rows.requested() and not ce_rows.wanted(torch.empty(1))  # CPU without the interpreter: torch path


_COMPILE_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unsloth_fx.runtime import ce_rows as C
for dt in ("bf16", "fp32"):
    for k, sig, const in [
        (C._stats_kernel, dict(x_ptr="*" + dt, lse_ptr="*fp32", m_ptr="*fp32", s_ptr="*fp32", V="i32", stride="i64"),
         dict(BLOCK=4096)),
        (C._grad_kernel, dict(x_ptr="*" + dt, tgt_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32", k_ptr="*fp32", V="i32",
                              stride="i64"), dict(BLOCK=4096, BF16=dt == "bf16")),
    ]:
        sig.update({c: "constexpr" for c in const})
        src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in const.items()})
        cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert "ld.global" in cc.asm["ptx"] and "st.global" in cc.asm["ptx"]
print("COMPILED-OK")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    # the interpreter checks the arithmetic; the real compiler also checks types and the constexpr branches
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if "COMPILED-OK" not in r.stdout and ("backend" in r.stderr.lower() and "nvidia" not in r.stderr.lower()):
        pytest.skip("triton build has no NVIDIA backend: " + r.stderr[-300:])
    assert "COMPILED-OK" in r.stdout, r.stderr[-3000:]
