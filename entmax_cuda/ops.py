"""Python side of the torch ops: fake (meta) kernels and the autograd formula.

The schemas and the CPU/CUDA kernels live in csrc/; the backward is an op of
its own (entmax_cuda::entmax_backward), so torch.compile sees both.
"""

from __future__ import annotations

import torch

forward_op = torch.ops.entmax_cuda.entmax_forward.default
backward_op = torch.ops.entmax_cuda.entmax_backward.default


@torch.library.register_fake("entmax_cuda::entmax_forward")
def _entmax_forward_fake(x, alpha, dim):
    torch._check(alpha.dim() == x.dim(), lambda: "entmax: alpha must have x's number of dimensions")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("entmax_cuda::entmax_backward")
def _entmax_backward_fake(grad_y, y, alpha, dim, alpha_grad=True):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty_like(alpha, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    _, alpha, dim = inputs
    ctx.save_for_backward(output, alpha)
    ctx.dim = dim


def _backward(ctx, grad_y):
    y, alpha = ctx.saved_tensors
    # the alpha-gradient (six more sums per row and two special functions per entry) only when asked for
    grad_x, grad_alpha = backward_op(grad_y, y, alpha, ctx.dim, ctx.needs_input_grad[1])
    if not ctx.needs_input_grad[0]:
        grad_x = None
    if not ctx.needs_input_grad[1]:
        grad_alpha = None
    return grad_x, grad_alpha, None


torch.library.register_autograd("entmax_cuda::entmax_forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, grad_grad_x, grad_grad_alpha):
    raise NotImplementedError(
        "entmax_cuda: double backward (gradients of gradients) is not implemented; "
        "use entmax_cuda.reference.entmax_bisect_reference for higher-order gradients"
    )


def _backward_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "entmax_cuda::entmax_backward", _no_double_backward, setup_context=_backward_setup_context
)
