"""Stacked MLPs: one set of weights per member, evaluated with batched matmuls.

Weights are shaped ``[S, in, out]`` and activations ``[S, B, features]``, so a population
of S small networks costs one ``baddbmm`` per layer instead of S tiny matmuls.

Bit-identity: on CPU, ``bmm`` picks a different kernel (a gemv path) when a matrix dimension
is 1, and that choice depends on S, so a member's result could change with its population.
Linear layers therefore pad an input or output width of 1 to 2 with zeros; every other
shape takes the same per-member kernel whatever S is (see tests/test_population.py).

Narrow outputs (a policy or value head) are computed transposed: MKL's batched gemm is
2-8x slower for a product with a few columns than for the same product with a few rows
(benchmarks in the comments of :func:`_affine`). Which form a layer takes depends only on
its shape and the number of rows per member, never on S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from study.trainer import kernels
from study.trainer.rng import STREAM_INIT, torch_seed


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """``x <- tanh(x)`` in place, in one fused pass (study.trainer.kernels.tanh_, within 4e-7 of
    ``torch.tanh``, which is 7x slower on these small tensors); returns ``x``."""
    if x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu":
        kernels.tanh_(x.numpy())
    else:  # other dtypes and devices: the same rational function in torch ops
        x.copy_(_tanh_rational(x))
    return x


def _tanh_rational(x: torch.Tensor) -> torch.Tensor:
    """The rational tanh of :func:`study.trainer.kernels.tanh_`, evaluated with torch operations."""
    v = x.clamp(-kernels.TANH_CLAMP, kernels.TANH_CLAMP)
    v2 = v * v
    p = torch.zeros_like(v)
    for a in kernels.TANH_P:
        p = p * v2 + a
    q = torch.zeros_like(v)
    for b in kernels.TANH_Q:
        q = q * v2 + b
    return p * v / q


class _Tanh(torch.autograd.Function):
    """:func:`tanh_` for autograd, with the derivative ``1 - tanh(x)^2``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = tanh_(x.detach().clone(memory_format=torch.contiguous_format))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1.0 - y * y)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Differentiable tanh (see :func:`tanh_`)."""
    return _Tanh.apply(x)


_ACTIVATIONS = {"tanh": tanh, "relu": torch.relu}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` ("tanh" or "relu")."""
    return _ACTIVATIONS[name]


# Output widths below this are narrow (see _affine).
_NARROW = 16


def _affine(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ w + b`` per member for widths already padded (contiguous ``[S, B, out]``).

    A narrow output is computed as ``(w^T x^T + b^T)^T`` with ``w^T`` contiguous
    (``transposed``: ``(w^T, b^T)`` when already made, see :func:`prepare`): 64 members x
    48 rows x 64 -> 2 take 49 us that way, 128 us with ``w^T`` as a strided view and 270 us
    directly. With one row per member that form would hit gemv, whose kernel depends on S,
    so it is skipped.
    """
    if w.shape[2] < _NARROW and x.shape[1] > 1:
        wt, bt = transposed or _transposed(w, b)
        return torch.baddbmm(bt, wt, x.transpose(1, 2)).transpose(1, 2).contiguous()
    return torch.baddbmm(b, x, w)


def _transposed(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()


def _weight_grad(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``h^T g`` per member (the gradient of ``h @ w``), contiguous ``[S, in, out]``.

    For a narrow output, ``(g^T h)^T`` is 4-7x faster (64 x 40 x 64 -> 2: 54 us against
    219 us) and, unlike the forward product, keeps its kernel whatever S is.
    """
    if g.shape[2] < _NARROW:
        return torch.bmm(g.transpose(1, 2), h).transpose(1, 2).contiguous()
    return torch.bmm(h.transpose(1, 2), g)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ w + b`` per member: x ``[S, B, in]``, w ``[S, in, out]``, b ``[S, 1, out]``."""
    n_in, n_out = w.shape[1], w.shape[2]
    if n_in == 1:
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)
        w = torch.cat([w, torch.zeros_like(w)], dim=1)
    if n_out == 1:
        w = torch.cat([w, torch.zeros_like(w)], dim=2)
        b = torch.cat([b, torch.zeros_like(b)], dim=2)
        return _affine(x, w, b)[..., :1]
    return _affine(x, w, b)


def init_layers(
    seeds: Sequence[int],
    sizes: Sequence[int],
    gains: Sequence[float],
    stream_offset: int,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Orthogonally initialised ``[w0, b0, w1, b1, ...]`` stacked over members.

    Member i draws from its own ``torch.Generator`` seeded by ``(seeds[i], stream)``, so
    its initial weights do not depend on the rest of the population. Biases start at 0.
    ``gains[l]`` scales layer l (SB3 convention: sqrt(2) hidden, 0.01 policy head, 1 value).
    """
    params: list[torch.Tensor] = []
    n_layers = len(sizes) - 1
    ws = [torch.empty(len(seeds), sizes[i], sizes[i + 1], dtype=dtype) for i in range(n_layers)]
    for m, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(torch_seed(seed, STREAM_INIT + 100 * stream_offset))
        for layer in range(n_layers):
            w = torch.empty(sizes[layer + 1], sizes[layer], dtype=dtype)
            torch.nn.init.orthogonal_(w, gain=gains[layer], generator=gen)
            ws[layer][m] = w.T
    for layer in range(n_layers):
        params.append(ws[layer])
        params.append(torch.zeros(len(seeds), 1, sizes[layer + 1], dtype=dtype))
    return params


def mlp(x: torch.Tensor, params: Sequence[torch.Tensor], activation: str) -> torch.Tensor:
    """Apply stacked layers ``[w0, b0, ...]``; the activation follows every layer but the last."""
    act = _ACTIVATIONS[activation]
    n_layers = len(params) // 2
    for layer in range(n_layers):
        x = linear(x, params[2 * layer], params[2 * layer + 1])
        if layer < n_layers - 1:
            x = act(x)
    return x


def hidden_gains(n_hidden: int, head_gain: float) -> list[float]:
    return [math.sqrt(2.0)] * n_hidden + [head_gain]


# --------------------------------------------------------------------------------------
# Hand-written forward/backward for the MLPs (no autograd)
#
# The trainer's gradient steps go through these: without autograd's bookkeeping, with
# activations computed in place, a gradient step costs about half as much on the small
# tensors of a population. tests/test_nets.py checks them against autograd.
# --------------------------------------------------------------------------------------


def _padded(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with widths of 1 padded to 2 with zeros (see the module docstring)."""
    if w.shape[1] == 1:
        w = torch.cat([w, torch.zeros_like(w)], dim=1)
    if w.shape[2] == 1:
        w = torch.cat([w, torch.zeros_like(w)], dim=2)
        b = torch.cat([b, torch.zeros_like(b)], dim=2)
    return w, b


class Prepared:
    """A stacked MLP's layers ready for :func:`forward_cached`: widths of 1 padded and
    narrow layers' transposed weights made contiguous, once for several forward passes
    (a rollout's). Valid until the weights change."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.layers = []
        for layer in range(len(params) // 2):
            w, b = _padded(params[2 * layer], params[2 * layer + 1])
            narrow = _transposed(w, b) if w.shape[2] < _NARROW else None
            self.layers.append((w, b, narrow))
        self.out_width = params[-1].shape[2]


@torch.no_grad()
def forward_cached(
    x: torch.Tensor,
    params: Sequence[torch.Tensor] | Prepared,
    activation: str,
    into: tuple[Sequence[torch.Tensor], int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output ``[S, B, out]`` and the input of every layer (for :func:`backward`).

    With ``into = (buffers, t)`` the hidden activations are written to ``buffers[l][:, t]``
    (``buffers[l]``: ``[S, T, B, width]``, contiguous) instead of new tensors: a rollout's
    steps then leave each member's activations contiguous for the gradient step, with no
    copy afterwards. The values are the same either way.
    """
    net = params if isinstance(params, Prepared) else Prepared(params)
    if x.shape[-1] == 1:
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)
    inputs: list[torch.Tensor] = []
    h = x
    last = len(net.layers) - 1
    for layer, (w, b, narrow) in enumerate(net.layers):
        inputs.append(h)
        h = _affine(h, w, b, narrow)
        if layer < last:
            if into is not None:
                buf, t = into[0][layer], into[1]
                if activation == "tanh" and h.dtype == torch.float32 and h.is_cpu:
                    kernels.tanh_into_(h.numpy(), buf.numpy(), t)
                else:
                    buf[:, t].copy_(h.clamp_(min=0.0) if activation == "relu" else tanh_(h))
                h = buf[:, t]
            elif activation == "relu":
                h.clamp_(min=0.0)
            else:
                tanh_(h)
    return h[..., : net.out_width], inputs


@torch.no_grad()
def backward(
    grad_out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    activation: str,
) -> list[torch.Tensor]:
    """Gradients ``[dw0, db0, dw1, ...]`` of a loss whose gradient with respect to the
    output of :func:`forward_cached` is ``grad_out`` (``[S, B, out]``). ``inputs`` may hold
    more rows than ``grad_out`` (rows B and beyond are ignored): passing the whole cache
    of a longer forward pass keeps it contiguous for the fused kernels."""
    n_layers = len(params) // 2
    if grad_out.shape[-1] == 1:
        grad_out = torch.cat([grad_out, torch.zeros_like(grad_out)], dim=-1)
    grads: list[torch.Tensor] = [torch.empty(0)] * len(params)
    g = grad_out
    db = g.sum(dim=1, keepdim=True)
    for layer in reversed(range(n_layers)):
        w = params[2 * layer]
        w_pad, _ = _padded(w, params[2 * layer + 1])
        h_all = inputs[layer]
        h = h_all if h_all.shape[1] == g.shape[1] else h_all[:, : g.shape[1]]
        dw = _weight_grad(h, g)
        grads[2 * layer] = dw if dw.shape == w.shape else dw[:, : w.shape[1], : w.shape[2]]
        grads[2 * layer + 1] = db[..., : w.shape[2]]
        if layer > 0:
            g = torch.bmm(g, w_pad.transpose(1, 2))
            if activation == "relu":
                g = torch.ops.aten.threshold_backward(g, h, 0.0)  # g where h > 0, one pass
                db = g.sum(dim=1, keepdim=True)
            elif g.dtype == torch.float32 and g.device.type == "cpu":
                # g * (1 - h^2) and its row sum (the bias gradient) in one pass
                db = g.new_empty(g.shape[0], 1, g.shape[2])
                kernels.tanh_backward_(g.numpy(), h_all.contiguous().numpy(), db.numpy())
            else:
                g.mul_(1.0 - h * h)
                db = g.sum(dim=1, keepdim=True)
    return grads


# --------------------------------------------------------------------------------------
# Stacked convolutions (autograd path)
#
# Each member's convolutions are torch's own ``conv2d`` on that member's images alone:
# a member's result then depends on its own data and shapes only, whatever the population,
# so bit-identity holds by construction (tests/test_networks.py checks it). The loop over
# members costs a few microseconds per call, little beside the convolutions themselves;
# the alternatives measured here were slower: im2col with one batched product per layer
# (its patch copy alone took 2x the product on Atari frames) and a grouped convolution
# (2x slower than the loop with its backward pass on Atari frames).
# --------------------------------------------------------------------------------------


def init_convs(
    seeds: Sequence[int],
    in_channels: int,
    convs: Sequence[tuple[int, int, int]],
    stream_offset: int,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Orthogonally initialised (gain sqrt(2), as SB3's feature extractors) stacked
    kernels ``[w0, b0, ...]`` (w ``[S, out, in, k, k]``, b ``[S, out]``) for
    ``convs = [(out_channels, kernel, stride), ...]``; each member draws from its own
    generator (see :func:`init_layers`)."""
    shapes, c = [], in_channels
    for out, k, _ in convs:
        shapes.append((out, c, k, k))
        c = out
    ws = [torch.empty(len(seeds), *shape, dtype=dtype) for shape in shapes]
    for m, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(torch_seed(seed, STREAM_INIT + 100 * stream_offset))
        for layer, shape in enumerate(shapes):
            w = torch.empty(shape[0], math.prod(shape[1:]), dtype=dtype)
            torch.nn.init.orthogonal_(w, gain=math.sqrt(2.0), generator=gen)
            ws[layer][m] = w.reshape(shape)
    params: list[torch.Tensor] = []
    for w in ws:
        params += [w, torch.zeros(len(seeds), w.shape[1], dtype=dtype)]
    return params


def cnn(x: torch.Tensor, params: Sequence[torch.Tensor],
        convs: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """ReLU convolutions ``convs`` on images x ``[S, B, C, H, W]`` (float), member by
    member, flattened (channel, height, width order), then, when ``params`` holds one more
    layer, a ReLU dense layer; returns ``[S, B, features]``."""
    n_conv = len(convs)
    out = []
    for m in range(x.shape[0]):
        h = x[m]
        for layer, (_, _, stride) in enumerate(convs):
            w, b = params[2 * layer][m], params[2 * layer + 1][m]
            h = torch.relu(torch.nn.functional.conv2d(h, w, b, stride=stride))
        out.append(h.reshape(h.shape[0], -1))
    feats = torch.stack(out)
    if len(params) > 2 * n_conv:
        feats = torch.relu(linear(feats, params[-2], params[-1]))
    return feats
