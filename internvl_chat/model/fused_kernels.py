"""Triton kernels for inference of the memory-bound steps between matmuls: RMSNorm, LayerNorm, a residual add
fused with the norm that follows it, rotary embedding, SiLU x gate and the ViT's layer-scaled residual.

In eager PyTorch, RMSNorm is six kernels over fp32 copies of the activations, rotary five over q and k, SiLU x
gate two and the layer-scaled residual two: memory-bound passes that, on a batched prefill of a quarter of a
million tokens, add up to seconds. Each kernel here reads its inputs once and writes its output once and rounds
where the reference rounds, so bf16 results are bit-identical to it: RMSNorm in fp32, cast to the input dtype,
then times the weight; rotary as q*cos + rotate_half(q)*sin with each product rounded; SiLU in fp32, cast, then
times the up projection; the layer-scaled branch rounded before the residual add (and Triton's fp fusion off where
a multiply and an add could otherwise become one FMA). LayerNorm is the exception: PyTorch reduces with Welford's
algorithm, the kernel with a two-pass mean and variance in fp32, so a small share of bf16 outputs differ by one
step. The reference ops are rms_norm_reference and rotary_reference below, and the modules' own PyTorch paths.

Used only where nothing needs a gradient (the modules check), on CUDA tensors of 16-bit types, with Triton
installed; everything else takes the reference PyTorch path. `TRITON_INTERPRET=1` runs the kernels on a CPU
(that is how the CPU tests check them).
"""

import os

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path everywhere
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_apply(*tensors: torch.Tensor) -> bool:
    """True when the Triton path may replace the reference for these tensors."""
    if triton is None or torch.compiler.is_compiling():  # inductor fuses these itself
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    first = tensors[0]
    return (
        (first.is_cuda or INTERPRET)
        and first.numel() > 0
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and first.dtype in (torch.bfloat16, torch.float16)
    )


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, (activated.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotary_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        length,
        x_batch_stride,
        x_position_stride,
        x_head_stride,
        table_batch_stride,
        table_position_stride,
        HEADS: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        token = tl.program_id(0)
        batch, position = (token // length).to(tl.int64), (token % length).to(tl.int64)
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, HEAD_DIM)[None, :]
        half: tl.constexpr = HEAD_DIM // 2
        partner = (dims + half) % HEAD_DIM  # rotate_half(x)[d] = -x[d + half] (d < half), x[d - half] (d >= half)
        inside = heads < HEADS
        base = x_ptr + batch * x_batch_stride + position * x_position_stride + heads * x_head_stride
        x = tl.load(base + dims, mask=inside, other=0.0)
        rotated = tl.load(base + partner, mask=inside, other=0.0)
        rotated = tl.where(dims < half, -rotated, rotated)
        table = batch * table_batch_stride + position * table_position_stride + dims
        cos = tl.load(cos_ptr + table)
        sin = tl.load(sin_ptr + table)
        dtype = out_ptr.dtype.element_ty
        out = (x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32) + (
            rotated.to(tl.float32) * sin.to(tl.float32)
        ).to(dtype).to(tl.float32)
        tl.store(out_ptr + (token * HEADS + heads).to(tl.int64) * HEAD_DIM + dims, out.to(dtype), mask=inside)

    @triton.jit
    def _scaled_residual_kernel(residual_ptr, branch_ptr, scale_ptr, out_ptr, count, width, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        residual = tl.load(residual_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        branch = tl.load(branch_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + offsets % width, mask=inside, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        scaled = (branch * scale).to(dtype).to(tl.float32)
        tl.store(out_ptr + offsets, (residual + scaled).to(dtype), mask=inside)

    @triton.jit
    def _residual_norm_kernel(
        residual_ptr,
        branch_ptr,
        scale_ptr,
        weight_ptr,
        bias_ptr,
        sum_ptr,
        out_ptr,
        width,
        eps,
        HAS_BRANCH: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RMS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row: [sum = residual + branch (* scale)], then out = norm(sum); sum is written when there is a
        branch. The norm is RMSNorm as the original's (normalised activations rounded before the weight) or
        LayerNorm as F.layer_norm (fp32 throughout, rounded once)."""
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        dtype = out_ptr.dtype.element_ty
        x = tl.load(residual_ptr + row * width + columns, mask=inside, other=0.0)
        if HAS_BRANCH:
            branch = tl.load(branch_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
            if HAS_SCALE:
                scale = tl.load(scale_ptr + columns, mask=inside, other=0.0).to(tl.float32)
                branch = (branch * scale).to(dtype).to(tl.float32)
            x = (x.to(tl.float32) + branch).to(dtype)
            tl.store(sum_ptr + row * width + columns, x, mask=inside)
        x = x.to(tl.float32)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        if RMS:
            variance = tl.sum(x * x, axis=0) / width
            out = weight * (x * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
        else:
            mean = tl.sum(x, axis=0) / width
            centred = tl.where(inside, x - mean, 0.0)
            variance = tl.sum(centred * centred, axis=0) / width
            normed = tl.rsqrt(variance + eps) * centred
            if HAS_BIAS:  # one FMA, as nvcc compiles PyTorch's gamma * normed + beta
                out = tl.fma(weight, normed, tl.load(bias_ptr + columns, mask=inside, other=0.0).to(tl.float32))
            else:
                out = weight * normed
        tl.store(out_ptr + row * width + columns, out.to(dtype), mask=inside)


def residual_norm(
    residual: torch.Tensor,
    branch: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
):
    """(residual + branch * scale, norm of that sum) in one pass over the rows; without a branch, norm(residual):
    RMSNorm and LayerNorm modules run this too (one norm kernel)."""
    width = residual.shape[-1]
    rows = residual.reshape(-1, width).contiguous()
    out = torch.empty_like(rows)
    total = torch.empty_like(rows) if branch is not None else rows
    branch_rows = branch.reshape(-1, width).contiguous() if branch is not None else rows
    block = triton.next_power_of_2(width)
    _residual_norm_kernel[(rows.shape[0],)](
        rows,
        branch_rows,
        scale if scale is not None else weight,
        weight,
        bias if bias is not None else weight,
        total,
        out,
        width,
        eps,
        HAS_BRANCH=branch is not None,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        RMS=rms,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
        enable_fp_fusion=False,
    )
    return total.view(residual.shape), out.view(residual.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the reference's rounding (silu rounded to the dtype first), one pass."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    count = gate.numel()
    block = 4096
    _silu_mul_kernel[(triton.cdiv(count, block),)](gate, up, out, count, BLOCK=block, num_warps=8)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] (any strides with a unit last one), cos/sin [B or 1, L, D] -> x*cos + rotate_half(x)*sin,
    laid out as [B, L, H, D] memory (what the attention kernels read) and returned as [B, H, L, D]."""
    batch, heads, length, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(batch, length, head_dim), sin.expand(batch, length, head_dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, length, heads, head_dim, dtype=x.dtype, device=x.device)
    _rotary_kernel[(batch * length,)](
        x,
        cos,
        sin,
        out,
        length,
        x.stride(0),
        x.stride(2),
        x.stride(1),
        cos.stride(0),
        cos.stride(1),
        HEADS=heads,
        HEADS_PAD=triton.next_power_of_2(heads),
        HEAD_DIM=head_dim,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out.transpose(1, 2)


def scaled_residual(residual: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """residual + branch * scale (scale over the last dimension), with the product rounded first."""
    residual, branch = residual.contiguous(), branch.contiguous()
    out = torch.empty_like(residual)
    count, block = residual.numel(), 4096
    _scaled_residual_kernel[(triton.cdiv(count, block),)](
        residual, branch, scale, out, count, scale.numel(), BLOCK=block, num_warps=8, enable_fp_fusion=False
    )
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, L, D] with cos/sin [B or 1, L, D]."""
    head_dim = x.shape[-1]
    if kernels_apply(x, cos, sin) and head_dim & (head_dim - 1) == 0:  # tl.arange needs a power of two
        return rotary(x, cos, sin)
    return rotary_reference(x, cos, sin)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The original's rotary in PyTorch ops: x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def add_scaled(residual: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """residual + branch * scale (the ViT's layer scale)."""
    if kernels_apply(residual, branch, scale) and residual.shape == branch.shape:
        return scaled_residual(residual, branch, scale)
    return residual + branch * scale


def rms_norm_reference(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The original's RMSNorm in PyTorch ops."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of this weight and eps: one kernel pass where it applies, else the reference ops. For the norms of
    transformers' Qwen2, Phi-3 and Llama too, which compute the same formula."""
    if kernels_apply(hidden_states, weight):
        return residual_norm(hidden_states, None, None, weight, None, eps, rms=True)[1]
    return rms_norm_reference(hidden_states, weight, eps)


def add_then_rms_norm(
    residual: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + branch, its RMSNorm) in one pass where the kernel applies."""
    if kernels_apply(residual, branch, weight) and residual.shape == branch.shape:
        return residual_norm(residual, branch, None, weight, None, eps, rms=True)
    total = residual + branch
    return total, rms_norm_reference(total, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm as the original InternLM2 and InternViT compute it (variance in fp32, the normalised activations
    cast back to the input dtype, then scaled by the weight); one Triton pass at inference."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the gated MLP's middle."""
    if kernels_apply(gate, up):
        return silu_mul(gate, up)
    return torch.nn.functional.silu(gate) * up


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict keys); one Triton pass at inference."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _norm_kernel_applies(self, hidden_states):
            return residual_norm(hidden_states, None, None, self.weight, self.bias, self.eps, rms=False)[1]
        return super().forward(hidden_states)


def _norm_kernel_applies(norm: nn.Module, *tensors: torch.Tensor) -> bool:
    if isinstance(norm, RMSNorm):
        parameters = (norm.weight,)
    elif isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and len(norm.normalized_shape) == 1:
        parameters = (norm.weight,) + ((norm.bias,) if norm.bias is not None else ())
    else:
        return False
    return kernels_apply(*tensors, *parameters)


def add_then_norm(
    residual: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add and the next norm: s = residual + branch (* scale), returns (s, norm(s)).
    One pass instead of an add that writes s and a norm that reads it back."""
    tensors = (residual, branch) + ((scale,) if scale is not None else ())
    if _norm_kernel_applies(norm, *tensors) and residual.shape == branch.shape:
        rms = isinstance(norm, RMSNorm)
        eps = norm.variance_epsilon if rms else norm.eps
        return residual_norm(residual, branch, scale, norm.weight, None if rms else norm.bias, eps, rms)
    total = add_scaled(residual, branch, scale) if scale is not None else residual + branch
    return total, norm(total)
