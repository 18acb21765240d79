"""The one-pass statistics against the foreach path and the float64 one-tensor specification."""

import math

import pytest
import torch
from reference import embedding_gradient, specification, torch_adam_state
from support import no_warnings

import adam_monitor.diagnostics.compiled as kernels
from adam_monitor.diagnostics import (
    COUNT,
    EPS_COUNT,
    GRAD_COUNT,
    JUMP_SQ,
    NUM_STATS,
    adam_statistics,
    diagnostics_from_statistics,
)
from adam_monitor.diagnostics.compiled import BLOCK, fast_adam_statistics

# Whole blocks and tails, a tensor below the compiled size, and one that never gets a gradient.
SHAPES = [(3, BLOCK), (2 * BLOCK + 5,), (BLOCK + 1, 3), (7,), (2 * BLOCK,)]


def adam_state(dtype, *, steps, amsgrad=False, eps=1e-8, betas=(0.9, 0.999)):
    """torch Adam on gradients with a per-coordinate scale (so v_{t-1} is well conditioned), a fifth
    of the coordinates never seeing a gradient (v = 0) unless ε = 0."""
    generator = torch.Generator().manual_seed(1)
    scales = {}

    def gradient(p, t):
        scale = scales.setdefault(id(p), torch.rand(p.shape, generator=generator) * 2 + 0.5)
        g = scale * (1 + 0.3 * torch.randn(p.shape, generator=generator))
        if eps > 0:  # with ε = 0 such a coordinate's step is 0/0 in torch Adam itself
            g.view(-1)[::5] = 0.0
        return g.to(p.dtype)

    return torch_adam_state(SHAPES, dtype, steps=steps, amsgrad=amsgrad, eps=eps, betas=betas, gradient=gradient)


def assert_rows_close(actual, expected, rtol):
    assert actual.shape == expected.shape and actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12)


@pytest.fixture
def small_compiled(monkeypatch):
    # Compile small shapes: every tensor with at least two blocks takes the compiled path.
    monkeypatch.setattr(kernels, "MIN_COMPILED_NUMEL", 2 * BLOCK)
    monkeypatch.setattr(kernels, "_disabled_reason", None)
    monkeypatch.delenv(kernels.EAGER_ENV, raising=False)


@pytest.fixture
def uncompiled_kernel(small_compiled, monkeypatch):
    # The same Python function executed eagerly: checks the fast path's math in every
    # configuration without paying one compilation each.
    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: kernels.block_sums_heads)
    monkeypatch.setenv(kernels.AHEAD_ENV, "0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_kernel_math_matches_specification(uncompiled_kernel, dtype, amsgrad, steps, eps):
    lists, kw = adam_state(dtype, steps=steps, amsgrad=amsgrad, eps=eps)
    fast = fast_adam_statistics(*lists, **kw)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_rows_close(fast, specification(lists, kw), rtol)
    # The foreach path squares a float32 norm: its own error is ~1e-5 on update_sq.
    assert_rows_close(fast, adam_statistics(*lists, **kw), 1e-12 if dtype == torch.float64 else 2e-5)
    if steps == 1:
        assert fast[:, JUMP_SQ].eq(0).all()


def test_compiled_matches_and_does_not_recompile(small_compiled):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for steps in (1, 2, 5):
        lists, kw = adam_state(torch.float32, steps=steps, eps=1e-8 if steps != 5 else 0.0)
        fast = fast_adam_statistics(*lists, **kw, compiled=True)
        assert_rows_close(fast, specification(lists, kw), 2e-6)
    # One graph for every size, step, ε (the first call may find it compiled by an earlier test).
    assert counters["stats"]["unique_graphs"] - graphs <= 1


def test_one_graph_for_any_number_and_sizes_of_tensors(small_compiled):
    # HEADS_PER_CALL tensors a call, the last call padded: 1, 5 and 6 tensors of sizes equal and
    # unequal within a call all run the graph of the test above.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=3)
    gen = torch.Generator().manual_seed(0)
    for sizes in (
        [5 * BLOCK + 3],
        [2 * BLOCK] * 5,
        [2 * BLOCK, 9 * BLOCK, 2 * BLOCK + 1, 4 * BLOCK, 3 * BLOCK, 2 * BLOCK],
    ):
        g = [torch.randn(n, generator=gen) for n in sizes]
        v = [0.01 * x * x + torch.rand(n, generator=gen) for x, n in zip(g, sizes)]
        m = [0.1 * x for x in g]
        fast = fast_adam_statistics(g, m, v, **kw, compiled=True)
        assert_rows_close(fast, specification((g, m, v), kw), 2e-6)
    assert counters["stats"]["unique_graphs"] - graphs <= 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_compiled_other_dtypes_and_amsgrad(small_compiled, dtype, amsgrad):
    for steps in (1, 3):
        lists, kw = adam_state(dtype, steps=steps, amsgrad=amsgrad)
        fast = fast_adam_statistics(*lists, **kw, compiled=True)
        assert_rows_close(fast, specification(lists, kw), 1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.slow
def test_float32_block_sums_are_accurate_on_16m_elements():
    # One float32 accumulator over 16M terms would be off by up to ~1e-3; blocks keep ~1e-7.
    torch.manual_seed(0)
    n = 1 << 24
    g = torch.randn(n) * (1 + torch.rand(n))
    v = 0.001 * g * g + 0.999 * 0.001 * torch.rand(n)
    m = 0.1 * g + 0.01 * torch.randn(n)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=3)
    fast = fast_adam_statistics([g], [m], [v], **kw, compiled=True)
    reference = specification(([g], [m], [v]), kw)
    assert_rows_close(fast, reference, 1e-5)


def test_compile_failure_falls_back_once(small_compiled, monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: broken)
    monkeypatch.setenv(kernels.AHEAD_ENV, "0")  # the kernel compiled in this process
    lists, kw = adam_state(torch.float32, steps=2)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        rows = fast_adam_statistics(*lists, **kw)
    assert_rows_close(rows, adam_statistics(*lists, **kw), 0)
    assert not kernels.compiled_available()
    with no_warnings():
        fast_adam_statistics(*lists, **kw)  # eager from now on, silently
    with pytest.raises(RuntimeError, match="no compiler"):
        fast_adam_statistics(*lists, **kw, compiled=True)


def test_environment_forces_eager(small_compiled, monkeypatch):
    monkeypatch.setenv(kernels.EAGER_ENV, "1")
    monkeypatch.setattr(kernels, "_compiled", lambda amsgrad, dtype: pytest.fail("compiled under ADAM_MONITOR_EAGER"))
    lists, kw = adam_state(torch.float32, steps=2)
    assert_rows_close(fast_adam_statistics(*lists, **kw), adam_statistics(*lists, **kw), 0)


def test_empty_and_noncontiguous(uncompiled_kernel):
    assert fast_adam_statistics([], [], [], beta1=0.9, beta2=0.999, eps=1e-8, step=1).shape == (0, NUM_STATS)
    lists, kw = adam_state(torch.float32, steps=3)
    transposed = [[t.t() if t.dim() == 2 else t for t in ts] for ts in lists]
    assert_rows_close(fast_adam_statistics(*transposed, **kw), specification(transposed, kw), 2e-6)
    assert math.isfinite(float(fast_adam_statistics(*lists, **kw).sum()))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_path_runs_in_bounded_chunks_with_the_same_rows(monkeypatch, amsgrad):
    lists, kw = adam_state(torch.float64, steps=3, amsgrad=amsgrad)
    sizes = [g.numel() for g in lists[0]]
    seen = []
    original = kernels.adam_statistics

    def recording(grads, *args, **kwargs):
        seen.append(sum(g.numel() for g in grads))
        return original(grads, *args, flat=False, **kwargs)

    monkeypatch.setattr(kernels, "adam_statistics", recording)
    whole = fast_adam_statistics(*lists, **kw, compiled=False)
    assert seen == [sum(sizes)]
    seen.clear()
    monkeypatch.setattr(kernels, "EAGER_CHUNK_NUMEL", max(sizes))  # forces several runs
    chunked = fast_adam_statistics(*lists, **kw, compiled=False)
    assert len(seen) > 1 and max(seen) <= max(sizes)
    assert_rows_close(chunked, whole, 1e-12)


@pytest.mark.parametrize("betas", [(0.9, 0.0), (0.0, 0.0), (0.0, 0.999)])
def test_every_beta_pair_torch_accepts_gets_finite_rows(uncompiled_kernel, betas):
    # β2 = 0 keeps nothing of v_{t-1}: no jump is defined (as at t = 1), and nothing divides by β2.
    lists, kw = adam_state(torch.float32, steps=4, betas=betas)
    fast = fast_adam_statistics(*lists, **kw)
    assert torch.isfinite(fast).all()
    assert_rows_close(fast, specification(lists, kw), 2e-6)
    assert_rows_close(fast, adam_statistics(*lists, **kw), 2e-5)
    if betas[1] == 0.0:
        assert fast[:, JUMP_SQ].eq(0).all()


def embedding_state(dtype):
    """torch Adam on embedding tables whose absent tokens get g = 0 (``embedding_gradient``), each
    split into blocks and a tail: the first table's head holds rows without a gradient, its tail
    only such rows; the second's tail holds rows with order-1, tiny and no gradients; the third is
    below the compiled size."""
    splits = {(200, 16): (40, 120, 20), (150, 14): (148, 1, 1), (5, 4): (1, 2, 1)}
    gradients = {shape: embedding_gradient(*split) for shape, split in splits.items()}
    lists, kw = torch_adam_state(list(splits), dtype, steps=3, gradient=lambda p, t: gradients[tuple(p.shape)](p, t))
    return lists, kw


def assert_embedding_rows(rows):
    # (ε-dominated, with a gradient, all) coordinates: tiny rows over order-1 and tiny rows
    assert rows[:, [EPS_COUNT, GRAD_COUNT, COUNT]].tolist() == [[1920, 2560, 3200], [14, 2086, 2100], [8, 12, 20]]
    assert diagnostics_from_statistics(rows)[:, 3].tolist() == [1920 / 2560, 14 / 2086, 8 / 12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_counts_eps_dominance_over_coordinates_with_a_gradient(uncompiled_kernel, dtype):
    lists, kw = embedding_state(dtype)
    fast = fast_adam_statistics(*lists, **kw)
    assert_embedding_rows(fast)
    assert_rows_close(fast, specification(lists, kw), 1e-12 if dtype == torch.float64 else 2e-6)


def test_compiled_counts_eps_dominance_over_coordinates_with_a_gradient(small_compiled):
    lists, kw = embedding_state(torch.float32)
    fast = fast_adam_statistics(*lists, **kw, compiled=True)
    assert_embedding_rows(fast)
    assert_rows_close(fast, specification(lists, kw), 2e-6)
