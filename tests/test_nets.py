"""Hand-written MLP gradients against autograd, and batched layers against plain matmuls."""

import pytest
import torch

from study.nets import backward, forward_cached, linear, mlp

torch.set_num_threads(1)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("sizes", [[4, 64, 64, 2], [5, 64, 1], [1, 8, 3], [3, 1], [2, 1, 4, 1]])
def test_backward_matches_autograd(activation, sizes):
    gen = torch.Generator().manual_seed(0)
    S, B = 3, 7
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        params += [
            torch.randn(S, a, b, generator=gen) / a**0.5,
            torch.randn(S, 1, b, generator=gen),
        ]
    x = torch.randn(S, B, sizes[0], generator=gen)
    target = torch.randn(S, B, sizes[-1], generator=gen)

    leaf = [p.clone().requires_grad_(True) for p in params]
    out = mlp(x, leaf, activation)
    ((out - target) ** 2).sum().backward()

    out_m, inputs = forward_cached(x, params, activation)
    torch.testing.assert_close(out_m, out.detach(), rtol=1e-6, atol=1e-6)
    grads = backward(2 * (out_m - target), inputs, params, activation)
    for g, p in zip(grads, leaf, strict=True):
        assert g.shape == p.shape
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


def test_linear_is_a_per_member_affine_map():
    gen = torch.Generator().manual_seed(1)
    x, w, b = (
        torch.randn(4, 5, 3, generator=gen),
        torch.randn(4, 3, 1, generator=gen),
        torch.randn(4, 1, 1, generator=gen),
    )
    y = linear(x, w, b)
    for s in range(4):
        torch.testing.assert_close(y[s], x[s] @ w[s] + b[s])
