"""Hand-written autograd functions for the model's hot spots.

Each computes what its plain torch counterpart computes, with a backward pass that keeps
less and passes over memory fewer times (tests/test_model.py checks the loss, the logits
and every gradient against the plain computation, in float32 and under bf16 autocast).
The model calls them through `rms_norm`, `swiglu` and `head_cross_entropy` at the end of
this file, which fall back to the plain ops where no gradient is needed and, for RMSNorm,
off the CPU (the case the hand-written backward was written for).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets with this value do not count in the loss


class RMSNormFunction(torch.autograd.Function):
    """F.rms_norm with a hand-written backward pass. On CPU, torch runs rms_norm's
    forward fused but differentiates its decomposition (pow, mean, rsqrt, two muls),
    keeping the normalised input for the gain's gradient; this keeps x and the (..., 1)
    reciprocal RMS and needs fewer passes over x (about 30% less time forward and back)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return cast(Tensor, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors  # rstd (..., 1) = 1 / rms(x)
        x_hat = x * rstd  # (..., D)
        d_weight = (grad * x_hat).flatten(0, -2).sum(0)  # (D,)
        g = grad * weight  # gradient with respect to x_hat
        # d x = rstd * (g - x_hat * mean(g * x_hat))
        dot = (g * x_hat).mean(-1, keepdim=True)  # (..., 1)
        d_x = torch.addcmul(g, x_hat, dot, value=-1).mul_(rstd)
        return d_x.to(x.dtype), d_weight.to(weight.dtype), None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up of gate_up = [gate, up] (..., 2h) -> (..., h).

    Autograd over chunk/silu/mul keeps silu(gate) besides gate_up, and its backward
    concatenates the two halves' gradients (a copy of the whole (..., 2h) gradient); this
    backward writes them into one (..., 2h) tensor and keeps only gate_up."""

    @staticmethod
    def forward(ctx: Any, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., h)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        d_gate, d_up = d_gate_up.chunk(2, dim=-1)
        torch.mul(F.silu(gate), grad, out=d_up)  # d up = grad * silu(gate)
        # d gate = grad * up * silu'(gate)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return d_gate_up


class HeadCrossEntropyFunction(torch.autograd.Function):
    """The output head and the mean cross entropy in one autograd node:
    (h (N, D), weight (V, D), targets (N,)) -> (logits (N, V), loss), the loss over the
    targets that are not IGNORE_INDEX.

    The gradient of the loss with respect to the logits, softmax - one-hot, is formed in
    the forward pass, a few rows at a time while they are in cache (log-softmax, the
    loss terms, exp, minus the one-hot); the backward pass scales the two small products
    (N, D) and (V, D) by the incoming gradient / n. F.cross_entropy keeps the
    log-probabilities instead, and its backward writes two more (N, V) tensors (a dense
    one-hot gradient, then softmax minus it): at a 32k vocabulary, passes over 65M floats
    per 2k tokens. The math is the same. The logits stay differentiable (a gradient that
    reaches them is added to the loss's)."""

    ROWS_ELEMENTS = 1 << 18  # logits per chunk of rows: 1 MB of float32, a core's L2

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(h, weight)  # (N, V), in autocast's dtype when it is on
        N, V = logits.shape
        valid = targets != IGNORE_INDEX  # (N,)
        safe = targets.masked_fill(~valid, 0)[:, None]  # (N, 1)
        minus_one = -valid[:, None].float()  # (N, 1)
        nll = logits.new_empty(N, dtype=torch.float32)
        # the gradient in the logits' dtype, what the backward's products take
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        step = max(1, HeadCrossEntropyFunction.ROWS_ELEMENTS // V)
        scratch = (
            None if grad.dtype == torch.float32 else logits.new_empty(step, V, dtype=torch.float32)
        )
        for i in range(0, N, step):
            j = min(i + step, N)
            out = grad[i:j] if scratch is None else scratch[: j - i]
            torch.log_softmax(logits[i:j], -1, dtype=torch.float32, out=out)
            nll[i:j] = out.gather(1, safe[i:j]).squeeze(1).neg_()
            out.exp_().scatter_add_(1, safe[i:j], minus_one[i:j])  # softmax - one-hot
            if scratch is not None:
                grad[i:j].copy_(out)
        n = valid.sum()
        loss = nll.masked_fill_(~valid, 0.0).sum() / n
        ignored = (~valid).nonzero().squeeze(1)
        if ignored.numel():
            grad.index_fill_(0, ignored, 0.0)
        ctx.save_for_backward(h, weight, grad, n)
        ctx.set_materialize_grads(False)
        return logits, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_logits: Tensor | None, grad_loss: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        h, weight, grad, n = ctx.saved_tensors
        scale = None
        if grad_loss is None:
            if grad_logits is None:
                return None, None, None
            g = grad_logits
        elif grad_logits is None:
            g, scale = grad, grad_loss / n
        else:
            g = grad * (grad_loss / n) + grad_logits
        dt = grad.dtype  # the logits' dtype
        g = g.to(dt)
        d_h = d_w = None
        if ctx.needs_input_grad[0]:
            d_h = g @ weight.to(dt)  # (N, D)
            d_h = (d_h if scale is None else d_h * scale).to(h.dtype)
        if ctx.needs_input_grad[1]:
            d_w = g.t() @ h.to(dt)  # (V, D)
            d_w = (d_w if scale is None else d_w * scale).to(weight.dtype)
        return d_h, d_w, None


# ---------------------------------------------------------------------------------------
# what the model calls


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """F.rms_norm of x (..., D) with gain weight (D,); differentiated by RMSNormFunction
    on CPU."""
    if (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
    ):
        return cast(Tensor, RMSNormFunction.apply(x, weight, eps))
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up = [gate, up] (..., 2h) -> (..., h)."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return cast(Tensor, SwiGLUFunction.apply(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)  # each (..., h)
    return F.silu(gate).mul_(up)


def head_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The output head and its loss: logits (..., V) = h (..., D) @ weight (V, D)^T, and the
    mean cross entropy in nats of the logits against targets (...) over the targets that
    are not IGNORE_INDEX (NaN when every one is)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        D = h.shape[-1]
        logits, loss = HeadCrossEntropyFunction.apply(h.reshape(-1, D), weight, targets.reshape(-1))
        return logits.view(*h.shape[:-1], -1), loss
    logits = F.linear(h, weight)  # (..., V)
    loss = F.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return logits, loss


__all__ = [
    "IGNORE_INDEX",
    "HeadCrossEntropyFunction",
    "RMSNormFunction",
    "SwiGLUFunction",
    "head_cross_entropy",
    "rms_norm",
    "swiglu",
]
