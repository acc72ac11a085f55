"""Hand-written MLP gradients against autograd, and batched layers against plain matmuls."""

import pytest
import torch

from study.trainer.nets import backward, forward_cached, linear, mlp

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


@pytest.mark.parametrize("rows", [1, 2, 7, 40])
@pytest.mark.parametrize("sizes", [[4, 64, 64, 2], [5, 64, 1], [3, 16, 8], [3, 64, 8], [5, 256, 2]])
def test_a_member_computes_the_same_bits_alone_and_in_a_population(rows, sizes):
    # Narrow layers take a transposed product whose kernel must not depend on S.
    gen = torch.Generator().manual_seed(2)
    S = 9
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        params += [torch.randn(S, a, b, generator=gen), torch.randn(S, 1, b, generator=gen)]
    x = torch.randn(S, rows, sizes[0], generator=gen)
    g_out = torch.randn(S, rows, sizes[-1], generator=gen)
    out, inputs = forward_cached(x, params, "tanh")
    grads = backward(g_out, inputs, params, "tanh")
    for s in (0, 4, 8):
        one = [p[s : s + 1] for p in params]
        out1, inputs1 = forward_cached(x[s : s + 1], one, "tanh")
        assert torch.equal(out1[0], out[s])
        for g1, g in zip(backward(g_out[s : s + 1], inputs1, one, "tanh"), grads, strict=True):
            assert torch.equal(g1[0], g[s])
