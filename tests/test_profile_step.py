"""benchmarks/profile_step.py: the kernel categories its per-category line sums (the profile itself is GPU only)."""

import os

import pytest

from _support import load_script

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_step.py")


@pytest.fixture(scope="module")
def ps():
    return load_script(SCRIPT, "profile_step")


@pytest.mark.parametrize("name,cat", [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "matmul"),
    ("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("_adamw_multi_kernel", "optimizer"),
    ("_bookkeep_kernel", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoH (Device -> Pinned)", "copy"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>", "copy"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_category(ps, name, cat):
    assert ps.kernel_category(name) == cat
