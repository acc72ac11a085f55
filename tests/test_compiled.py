"""The compiled MLP passes (study.trainer.compiled) against the torch passes they replace:
the same bits, not merely close, for the passes and for whole training runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study import config as cfg
from study.trainer import compiled_a2c, compiled_value
from study.trainer.compiled import MODES, CompiledMLP, torch_passes
from study.trainer.envs.cartpole import CartPolePopulation
from study.trainer.nets import backward, forward_cached
from study.trainer.population import Member, train_population


def _network(widths: list[int], members: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        params += [torch.randn(members, n_in, n_out, generator=g) * 0.3,
                   torch.randn(members, 1, n_out, generator=g) * 0.1]
    return params


@pytest.mark.parametrize("widths", [[4, 64, 64, 2], [4, 64, 64, 1], [3, 32, 1],
                                    [8, 128, 64, 4], [6, 16, 24, 3], [2, 64, 1]])
@pytest.mark.parametrize("rows", [4, 8, 40, 48, 400])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_compiled_passes_give_torch_bits(widths, rows, activation):
    params = _network(widths, 3, seed=rows)
    compiled = CompiledMLP.for_network(params, activation)
    assert compiled is not None
    x = torch.randn(3, rows, widths[0], generator=torch.Generator().manual_seed(7))
    out, inputs = forward_cached(x, params, activation)
    plan = compiled.forward_plan(rows)
    assert plan is not None and set(plan) <= set(MODES)  # these shapes all have one
    got, got_inputs = compiled.forward(x, params, plan)
    assert torch.equal(got, out)
    assert all(torch.equal(a, b) for a, b in zip(got_inputs, inputs, strict=True))

    # A backward pass over the first rows of a longer cache (as the fused value step does;
    # 9 and 39 rows: tiles of four rows with the last clamped).
    n = {4: 4, 8: 8, 40: 32, 48: 39, 400: 9}[rows]
    g_out = torch.randn(3, n, widths[-1], generator=torch.Generator().manual_seed(8))
    expected = backward(g_out, inputs, params, activation)
    back = compiled.backward_plan(n, rows)
    assert back is not None
    grads = compiled.backward(g_out, inputs, params, back)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


def test_compiled_passes_serve_only_what_they_compute():
    tanh = _network([4, 64, 2], 2, seed=0)
    assert CompiledMLP.for_network(tanh, "gelu") is None  # tanh and relu only
    assert CompiledMLP.for_network(_network([4, 2], 2, 0), "tanh") is None  # no hidden layer
    assert CompiledMLP.for_network(_network([1, 8, 2], 2, 0), "tanh") is None  # 1-wide input
    assert CompiledMLP.for_network([p.double() for p in tanh], "tanh") is None
    with torch_passes():
        assert CompiledMLP.for_network(tanh, "tanh") is None


def test_a_product_no_mode_reproduces_is_left_to_torch(monkeypatch):
    import study.trainer.compiled as compiled_mod

    compiled = CompiledMLP(_network([4, 32, 2], 2, seed=1))
    monkeypatch.setattr(compiled_mod, "MODES", (compiled_mod.DOT4,))  # wrong for hidden layers
    assert compiled.forward_plan(8) is None
    assert compiled.backward_plan(8, 8) is None


def _runs(env_id, members, steps):
    results = train_population(env_id, members, steps, log_every=500, save_policies=True)
    return [(r.status, r.diverged_at_step, r.final_return, r.curve, r.policy_state)
            for r in results]


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    return a == b or (a != a and b != b)


def _compare(env_id, members, steps, compiled_path=compiled_a2c.CompiledA2C):
    """Train with a compiled path (the A2C loop, or the value steps; checking that it ran)
    and without it; the same bits."""
    calls = []
    real_run = compiled_path.run

    def counted(self, *args):
        calls.append(1)
        return real_run(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled_path, "run", counted)
        compiled = _runs(env_id, members, steps)
    with torch_passes():
        reference = _runs(env_id, members, steps)
    assert calls, f"{compiled_path.__name__} did not run"
    assert _same(compiled, reference)
    return compiled


@pytest.mark.parametrize(("env_id", "overrides"), [
    ("CartPole-v1", {}),
    ("CartPole-v1", {"normalize_advantage": True, "policy_hidden_sizes": [32],
                     "value_hidden_sizes": [48, 16], "policy_optimizer": "adam",
                     "value_optimizer": "adam", "num_envs": 3, "n_steps": 7}),
    ("CartPole-v0", {"value_target": "mc", "gamma": 0.9, "lam": 0.95, "entropy_coef": 0.01,
                     "policy_hidden_sizes": [64, 32, 16]}),
    ("CartPole-v1", {"activation": "relu", "n_steps": 50, "lam": 0.95}),  # 400-row updates
    ("CartPole-v1", {"activation": "relu", "n_steps": 50, "policy_hidden_sizes": [128, 64],
                     "value_hidden_sizes": [128, 128], "policy_optimizer": "adam",
                     "value_max_grad_norm": float("inf"), "value_target": "mc"}),
])
def test_the_compiled_loop_changes_no_bit(env_id, overrides):
    hp = cfg.resolve(overrides)
    runs = _compare(env_id, [Member(hp, s) for s in (0, 1)], 3000)
    assert all(r[0] == "ok" and np.isfinite(r[2]) for r in runs)


def test_the_compiled_loop_bootstraps_truncations_like_the_trainer(monkeypatch):
    # A 12-step time limit: most episodes end by truncation, bootstrapped from V(final obs).
    from study.trainer import envs

    fast = envs.FAST_ENVS["CartPole-v1"]
    monkeypatch.setitem(envs.FAST_ENVS, "CartPole-v1", envs.FastEnv(
        lambda seeds, n, stream: CartPolePopulation(seeds, n, stream, max_episode_steps=12),
        fast.spaces))
    runs = _compare("CartPole-v1", [Member(cfg.resolve({}), s) for s in (3, 4)], 2000)
    assert all(np.nanmax(r[3]["episode_length"]) == 12 for r in runs)


def test_a_member_that_diverges_in_the_compiled_loop_stops_as_in_the_trainer():
    steady = cfg.resolve({})
    wild = cfg.resolve({"policy_lr": 1e38, "value_lr": 1e38, "max_grad_norm": 1e38,
                        "value_max_grad_norm": 1e38})
    runs = _compare("CartPole-v1", [Member(steady, 0), Member(wild, 1), Member(steady, 2)], 3000)
    assert [r[0] for r in runs] == ["ok", "diverged", "ok"]


def test_networks_the_loop_does_not_reproduce_keep_the_trainers_path(monkeypatch):
    # A 256-unit layer's forward product is summed in MKL's blocks: the loop declines it.
    hp = cfg.resolve({"value_hidden_sizes": [256, 64]})
    members = [Member(hp, 0)]
    calls = []
    monkeypatch.setattr(compiled_a2c.CompiledA2C, "run", lambda self, n: calls.append(n))
    runs = _runs("CartPole-v1", members, 1200)
    with torch_passes():
        reference = _runs("CartPole-v1", members, 1200)
    assert not calls
    assert _same(runs, reference)


def test_with_the_loop_a_member_trains_alike_alone_in_a_population_and_when_pruned():
    hp = cfg.resolve({"num_envs": 4, "n_steps": 25})  # 100-row updates
    alone = train_population("CartPole-v1", [Member(hp, 7)], 4000, log_every=500,
                             eval_every=1000, eval_episodes=3)[0]
    prune_at = 2000  # the population's first member is pruned there, the others go on

    def on_log(step, row):
        return np.array([step >= prune_at, False, False])

    crowd = train_population("CartPole-v1", [Member(hp, 3), Member(hp, 7), Member(hp, 9)],
                             4000, log_every=500, eval_every=1000, eval_episodes=3,
                             on_log=on_log)
    assert crowd[0].status == "pruned" and crowd[1].status == "ok"
    assert _same((alone.final_return, alone.final_eval_return, alone.curve),
                 (crowd[1].final_return, crowd[1].final_eval_return, crowd[1].curve))
    with torch_passes():
        reference = train_population("CartPole-v1", [Member(hp, 3), Member(hp, 7), Member(hp, 9)],
                                     4000, log_every=500, eval_every=1000, eval_episodes=3,
                                     on_log=on_log)
    assert _same([(r.status, r.env_steps, r.curve) for r in crowd],
                 [(r.status, r.env_steps, r.curve) for r in reference])


# ---------------------------------------------------------------------- compiled value fitting
_BLOG = {"num_envs": 8, "n_steps": 300, "gamma": 0.999, "lam": 0.99,
         "policy_hidden_sizes": [64], "value_hidden_sizes": [64], "activation": "relu",
         "policy_optimizer": "adam", "value_optimizer": "adam", "policy_lr": 0.01,
         "value_lr": 0.1, "value_iters": 3, "value_target": "mc",
         "normalize_advantage": True, "log_std_init": 0.5, "max_grad_norm": float("inf"),
         "value_max_grad_norm": float("inf")}


def _compare_value_fit(env_id, members, steps):
    return _compare(env_id, members, steps, compiled_value.CompiledValueFit)


@pytest.mark.parametrize(("env_id", "overrides"), [
    # seed 000's agent: 2,400-row batches (chunks of 1,024, 1,024 and 352 rows)
    ("CartPoleSwingUp-v0", {}),
    # tanh, RMSprop, clipped, c_v = 0.5; 2,664 rows: the last chunk's 616 rows end in a
    # partial 16-row block
    ("CartPoleSwingUp-v0", {"activation": "tanh", "value_hidden_sizes": [32], "n_steps": 333,
                            "value_optimizer": "rmsprop", "value_max_grad_norm": 0.5,
                            "value_coef": 0.5, "value_iters": 2}),
    # 48 units: column blocks that repeat, torch's column sums past the 32-column groups,
    # and other product modes; GAE targets on a discrete task
    ("CartPole-v1", {"value_hidden_sizes": [48], "n_steps": 160, "value_target": "gae",
                     "policy_hidden_sizes": [32]}),
    # 40-row batches with five value steps each (SB3's shape, more value steps)
    ("Pendulum-v1", {"num_envs": 4, "n_steps": 10, "value_iters": 5, "activation": "tanh",
                     "value_hidden_sizes": [16]}),
])
def test_compiled_value_steps_change_no_bit(env_id, overrides):
    hp = cfg.resolve({**_BLOG, **overrides})
    steps = 3 * hp["num_envs"] * hp["n_steps"]
    runs = _compare_value_fit(env_id, [Member(hp, s) for s in (0, 1)], steps)
    assert all(r[0] == "ok" for r in runs)


def test_a_member_whose_value_steps_diverge_stops_as_in_the_trainer():
    steady = cfg.resolve({**_BLOG, "n_steps": 100})
    wild = cfg.resolve({**_BLOG, "n_steps": 100, "value_lr": 1e38})
    runs = _compare_value_fit("CartPoleSwingUp-v0",
                              [Member(steady, 0), Member(wild, 1), Member(steady, 2)], 4000)
    assert [r[0] for r in runs] == ["ok", "diverged", "ok"]


def test_with_compiled_value_steps_a_member_trains_alike_alone_and_in_a_population():
    hp = cfg.resolve({**_BLOG, "n_steps": 150})
    alone = _runs("CartPoleSwingUp-v0", [Member(hp, 5)], 3600)[0]
    crowd = _runs("CartPoleSwingUp-v0", [Member(hp, s) for s in (3, 5, 8)], 3600)
    assert _same(alone, crowd[1])


def test_value_networks_the_compiled_steps_do_not_serve_keep_the_trainers_path(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled_value.CompiledValueFit, "run", lambda *a: calls.append(1))
    for overrides in ({"value_hidden_sizes": [64, 64]},  # two hidden layers
                      {"value_hidden_sizes": [40]},  # not a multiple of 16 units
                      {"n_minibatches": 4}):  # shuffled minibatches
        hp = cfg.resolve({**_BLOG, "n_steps": 50, **overrides})
        _runs("CartPoleSwingUp-v0", [Member(hp, 0)], 800)
    assert not calls


def _dot4_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DOT4's order in plain float32 steps: four partial sums over k mod 4, then
    (p0 + p2) + (p1 + p3)."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            p = [np.float32(0.0)] * 4
            for k in range(a.shape[1]):
                p[k % 4] = np.float32(p[k % 4] + np.float32(a[i, k] * b[k, j]))
            out[i, j] = (p[0] + p[2]) + (p[1] + p[3])
    return out


@pytest.mark.parametrize(("rows", "inner", "cols", "transposed"), [
    (48, 64, 1, False), (8, 64, 2, False), (7, 12, 3, False),  # four rows to a vector, rest
    (9, 10, 2, False),  # a length that is not a multiple of 4
    (64, 40, 8, True),  # a transposed operand (strided rows): one output at a time
])
def test_the_dot4_product_keeps_its_order_on_every_path(rows, inner, cols, transposed):
    from study.trainer.compiled import _product_dot4

    g = np.random.default_rng(rows)
    a = g.standard_normal((inner, rows) if transposed else (rows, inner)).astype(np.float32)
    a = a.T if transposed else a
    b = g.standard_normal((inner, cols)).astype(np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    _product_dot4(a, b, out)
    assert np.array_equal(out, _dot4_reference(a, b))


@pytest.mark.parametrize(("rows", "inner", "cols"), [
    (8, 64, 64), (9, 7, 16), (5, 64, 100), (13, 3, 200), (1, 4, 24)])  # clamped rows, columns
def test_the_register_tiles_sum_in_order(rows, inner, cols):
    """The tiles (four rows by 64 columns in registers) give the bits of the scalar
    products: every term in order from k = 0, fused or rounded."""
    from study.trainer.compiled import (
        _product_fma,
        _product_separate,
        _tiles_fma,
        _tiles_separate,
    )

    g = np.random.default_rng(rows * cols)
    a = g.standard_normal((rows, inner)).astype(np.float32)
    b = g.standard_normal((inner, cols)).astype(np.float32)
    expected = np.zeros((rows, cols), dtype=np.float32)
    for k in range(inner):  # rounded products added in order
        expected = expected + np.outer(a[:, k], b[k]).astype(np.float32)
    for tiles, scalar in ((_tiles_separate, _product_separate), (_tiles_fma, _product_fma)):
        got, want = np.empty_like(expected), np.empty_like(expected)
        tiles(a, b, got)
        scalar(a, b, want)
        assert np.array_equal(got, want)
    _tiles_separate(a, b, got := np.empty_like(expected))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (16, 48), (64, 2), (20, 16)])
def test_transposed_copies_are_exact(shape):
    from study.trainer.compiled import _transpose_into

    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for src in (w, np.repeat(w, 2, axis=1)[:, ::2]):  # contiguous rows, then strided ones
        t = np.full(shape[::-1], np.nan, dtype=np.float32)
        _transpose_into(src, t)
        assert np.array_equal(t, w.T)


@pytest.mark.parametrize(("rows", "inner", "cols"), [
    (64, 40, 2), (64, 40, 1), (20, 7, 3), (100, 1, 5), (9, 40, 2)])  # clamped; < 16 rows
def test_narrow_products_sum_in_order_along_the_long_side(rows, inner, cols):
    """A weight gradient ``h^T g`` with a narrow ``g`` (a head's): 64 of h's units by two
    columns of sums in registers give every sum's terms in order, fused or rounded."""
    from study.trainer.compiled import _product_columns_fma, _product_columns_separate

    g = np.random.default_rng(rows * cols + inner)
    h = g.standard_normal((inner, rows)).astype(np.float32)
    b = g.standard_normal((inner, cols)).astype(np.float32)
    rounded = np.zeros((rows, cols), dtype=np.float32)
    fused = np.zeros((rows, cols), dtype=np.float64)
    for k in range(inner):
        rounded = rounded + np.outer(h[k], b[k]).astype(np.float32)
        # a fused multiply-add rounds once; here the product is exact in float64 and the
        # sum rounds twice (to float64, then float32), the same for these inputs
        fused = (fused + np.outer(h[k].astype(np.float64), b[k])).astype(np.float32)
    for product, want in ((_product_columns_separate, rounded), (_product_columns_fma, fused)):
        out = np.empty((rows, cols), dtype=np.float32)
        product(h.T, b, out)
        assert np.array_equal(out, want)


@pytest.mark.parametrize(("rows", "width"), [(40, 64), (9, 80), (5, 21), (3, 7), (48, 128)])
def test_the_tanh_gradient_keeps_each_bias_sum_in_row_order(rows, width):
    """kernels.tanh_backward_rows in registers (64 then 16 columns) and one column at a
    time: ``g (1 - y^2)`` rounded step by step, its column sums over rows in order."""
    from study.trainer.kernels import tanh_backward_rows

    r = np.random.default_rng(rows + width)
    g = r.standard_normal((rows, width)).astype(np.float32)
    y = np.tanh(r.standard_normal((rows + 2, width))).astype(np.float32)  # more rows: ignored
    one = np.float32(1.0)
    want = g * (one - y[:rows] * y[:rows])
    sums = np.zeros(width, dtype=np.float32)
    for i in range(rows):
        sums = sums + want[i]
    for y_rows in (y, np.repeat(y, 2, axis=1)[:, ::2]):  # contiguous rows, then strided ones
        got, db = g.copy(), np.empty(width, dtype=np.float32)
        tanh_backward_rows(got, y_rows, db)
        assert np.array_equal(got, want) and np.array_equal(db, sums)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_bias_added_in_the_activation_pass_rounds_as_a_pass_of_its_own(activation):
    from study.trainer.compiled import _NO_BIAS, ACTIVATIONS, _activate, _add_bias

    r = np.random.default_rng(1)
    out = r.standard_normal((9, 70)).astype(np.float32)
    bias = r.standard_normal(70).astype(np.float32)
    fused, separate = out.copy(), out.copy()
    _activate(fused, ACTIVATIONS[activation], bias)
    _add_bias(separate, bias)
    _activate(separate, ACTIVATIONS[activation], _NO_BIAS)
    assert np.array_equal(fused, separate)
    assert not np.array_equal(fused, out)


def test_the_cache_stamp_covers_every_module_the_compiled_functions_call():
    """numba checks a cached function against its own file only: a module whose compiled
    functions the compiled modules import (the function itself, or the module) must be in
    numba_cache's sources, or an edit there leaves its old code inside cached callers."""
    import importlib
    import inspect
    from pathlib import Path

    from numba.core.dispatcher import Dispatcher

    from study.trainer import numba_cache

    root = Path(numba_cache.__file__).parent

    def has_compiled(module):
        return any(isinstance(v, Dispatcher) and v.py_func.__module__ == module.__name__
                   for v in vars(module).values())

    called = set()
    for name in ("compiled", "compiled_a2c", "compiled_cnn", "compiled_value", "kernels",
                 "envs.minatar_compiled", "envs.minatar_freeway", "envs.minatar_asterix",
                 "envs.numpy_mt"):
        for value in vars(importlib.import_module(f"study.trainer.{name}")).values():
            if isinstance(value, Dispatcher):
                called.add(Path(inspect.getfile(value.py_func)))
            elif inspect.ismodule(value) and value.__name__.startswith("study.trainer.") \
                    and has_compiled(value):
                called.add(Path(value.__file__))
    called_files = {p.relative_to(root).as_posix() for p in called}
    assert {"envs/minatar_compiled.py", "envs/minatar_space_invaders.py",
            "envs/numpy_mt.py"} <= called_files
    assert not called_files - set(numba_cache._SOURCES)


def test_a_cold_or_stale_kernel_cache_is_announced(monkeypatch, tmp_path):
    """The drivers say that the kernels compile (their first progress figures include it)
    after an install (no cache) and after an upgrade (a stale cache, dropped then)."""
    from study.trainer import numba_cache

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert numba_cache.cold_cache()  # nothing cached yet
    cached = tmp_path / "kernels.rmsprop_step-1.py311.nbi"
    cached.write_bytes(b"")
    caller = tmp_path / "envs_1a2b" / "minatar_compiled.step_games-99.py311.nbc"
    caller.parent.mkdir()
    caller.write_bytes(b"")
    assert not numba_cache.cold_cache()  # cached, from these sources
    assert caller.exists()
    (tmp_path / "study-compiled.sources").write_text("the sources of another version")
    assert numba_cache.cold_cache()  # stale: dropped, to compile again
    assert not cached.exists() and not caller.exists()
