"""adam_monitor.optim: exactness against torch and plain loops, validation, state, statistics, fast path."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch

from adam_monitor.diagnostics import COUNT, EPS_COUNT, GRAD_COUNT, NUM_STATS, STALENESS_SQ, tensor_statistics
from adam_monitor.optim import Adam, AdamAtan2, AdamD, LaProp, StableAdamW, worst_case_bound

F64 = torch.float64


def make_params(shapes=((3, 4), (5,)), dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def gradient_sequence(params, steps, seed=1, heavy=False):
    """Random gradients with a per-step scale that wanders over orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(steps):
        scale = 10 ** (4 * torch.rand((), generator=gen, dtype=F64).item() - 2) if heavy else 1.0
        seq.append([scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params])
    return seq


def run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def run_twins(optimizer, twin_optimizer, params, twins, grads):
    """Step two optimizers of twin params on the same gradients; yields after each step."""
    for step_grads in grads:
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        twin_optimizer.step()
        yield


# ----------------------------------------------------------------------------- plain-loop reference


def reference_run(p0, grads, *, lr, beta1, beta2, eps, weight_decay, mbc, normalize="adam", clip=None, beta2_at=None):
    """Per-coordinate float64 Python loop over one tensor (flattened lists). One dict per step."""
    n = len(p0)
    p, m, v = list(p0), [0.0] * n, [0.0] * n
    product = 1.0
    out = []
    for t, g in enumerate(grads, start=1):
        b2 = beta2 if beta2_at is None else beta2_at(t)
        if beta2_at is None:
            c2, c2_prev = 1 - beta2**t, 1 - beta2 ** (t - 1)
        else:
            product, product_prev = product * b2, product
            c2, c2_prev = 1 - product, 1 - product_prev
        c1 = 1 - beta1**t if mbc else 1.0
        v_prev = v
        v = [b2 * v[i] + (1 - b2) * g[i] * g[i] for i in range(n)]
        v_hat = [v[i] / c2 for i in range(n)]
        if normalize == "laprop":
            m = [beta1 * m[i] + (1 - beta1) * g[i] / (math.sqrt(v_hat[i]) + eps) for i in range(n)]
            u = [m[i] / c1 for i in range(n)]
        else:
            m = [beta1 * m[i] + (1 - beta1) * g[i] for i in range(n)]
            if normalize == "adam":
                u = [(m[i] / c1) / (math.sqrt(v_hat[i]) + eps) for i in range(n)]
            else:
                u = [1.27 * math.atan2(m[i] / c1, math.sqrt(v_hat[i])) for i in range(n)]
        s = 1.0
        if clip is not None:
            floor = max(eps * eps, torch.finfo(F64).tiny)
            rms = math.sqrt(sum(g[i] ** 2 / max(v_hat[i], floor) for i in range(n)) / n)
            s = 1 / max(1.0, rms / clip)
        u = [s * x for x in u]
        p = [p[i] - lr * weight_decay * s * p[i] - lr * u[i] for i in range(n)]
        out.append(dict(p=p, m=m, v=v, u=u, v_hat=v_hat, v_hat_prev=[x / c2_prev for x in v_prev] if t > 1 else None))
    return out


def reference_for(params, grads, **kw):
    """Run ``reference_run`` on each tensor; returns per tensor the list of per-step dicts."""
    return [
        reference_run(p.detach().flatten().tolist(), [g[k].flatten().tolist() for g in grads], **kw)
        for k, p in enumerate(params)
    ]


def assert_close_rel(actual, expected, rtol):
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def assert_follows_reference(p, p0, ref, state=None, rtol=1e-12):
    """``p`` moved from ``p0`` as the reference run's last step says (relative to the total move),
    and, given its ``state``, holds the reference's moments."""
    moved = p.detach().flatten() - p0.detach().flatten()
    assert_close_rel(moved, torch.tensor(ref[-1]["p"], dtype=F64) - p0.detach().flatten(), rtol)
    if state is not None:
        assert_close_rel(state["exp_avg"].flatten(), ref[-1]["m"], rtol)
        assert_close_rel(state["exp_avg_sq"].flatten(), ref[-1]["v"], rtol)


PRESETS = {
    "AdamD": (AdamD, dict(mbc=False, normalize="adam", eps=1e-8)),
    "LaProp": (LaProp, dict(mbc=True, normalize="laprop", eps=1e-8)),
    "AdamAtan2": (AdamAtan2, dict(mbc=True, normalize="atan2", eps=0.0)),
    "StableAdamW": (StableAdamW, dict(mbc=True, normalize="adam", eps=1e-8, clip=1.0)),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_plain_loop(name):
    cls, ref_kw = PRESETS[name]
    params = make_params()
    p0 = clone_params(params)
    grads = gradient_sequence(params, 40, heavy=True)
    kw = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
    opt = cls(params, **kw, compiled=False)
    run(opt, params, grads)
    refs = reference_for(p0, grads, lr=0.05, beta1=0.9, beta2=0.99, weight_decay=0.1, **ref_kw)
    for p, q, ref in zip(params, p0, refs):
        assert_follows_reference(p, q, ref, opt.state[p])


def test_update_clip_is_active_in_the_test_above():
    # the heavy-tailed gradients must actually trigger the clip, or the StableAdamW test proves nothing
    params = make_params()
    grads = gradient_sequence(params, 40, heavy=True)
    refs = reference_for(params, grads, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, mbc=True)
    rms = [
        math.sqrt(sum(g * g / max(vh, 1e-16) for g, vh in zip(grads[t][0].flatten().tolist(), ref["v_hat"])) / 12)
        for t, ref in enumerate(refs[0])
    ]
    assert max(rms) > 1.5


@pytest.mark.parametrize("schedule", ["adafactor", "callable"])
def test_beta2_schedule_matches_plain_loop(schedule):
    params = make_params()
    p0 = clone_params(params)
    grads = gradient_sequence(params, 30)
    if schedule == "adafactor":
        opt_schedule, beta2_at = "adafactor", (lambda t: min(0.99, 1 - t**-0.8))
    else:
        opt_schedule = beta2_at = lambda t: 0.99 - 0.5 * 0.8**t  # noqa: E731
    opt = Adam(params, lr=0.05, betas=(0.9, 0.99), weight_decay=0.01, beta2_schedule=opt_schedule, compiled=False)
    run(opt, params, grads)
    refs = reference_for(
        p0, grads, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, mbc=False, beta2_at=beta2_at
    )
    for p, q, ref in zip(params, p0, refs):
        assert_follows_reference(p, q, ref)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # applied at compute time, never written back
    if schedule == "adafactor":
        assert opt.state[params[0]]["beta2_product"] == 0.0  # β2_1 = 0: c2 = 1 exactly


# ----------------------------------------------------------------------------- torch equivalence


def grouped(params):
    return [
        {"params": params[:1], "lr": 0.03, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1},
        {"params": params[1:2], "lr": 0.01, "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        {"params": params[2:], "lr": 0.002, "betas": (0.5, 0.99), "eps": 1e-3, "weight_decay": 0.5},
    ]


def test_bias_corrected_adam_equals_torch_adamw():
    params = make_params(shapes=((4, 3), (6,), (2, 2, 2)))
    twins = clone_params(params)
    p0 = clone_params(params)
    ours = Adam(grouped(params), momentum_bias_correction=True, compiled=False)
    torch_opt = torch.optim.AdamW(grouped(twins))
    for _ in run_twins(ours, torch_opt, params, twins, gradient_sequence(params, 100, heavy=True)):
        pass
    for p, q, z in zip(params, twins, p0):
        assert_close_rel(p.detach(), q.detach(), 1e-12)
        assert_close_rel(p.detach() - z.detach(), q.detach() - z.detach(), 1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_rel(ours.state[p][key], torch_opt.state[q][key], 1e-12)
        assert ours.state[p]["step"] == torch_opt.state[q]["step"] == 100


def test_beta1_equal_beta2_bounds_every_update_by_one():
    params = make_params(shapes=((50,),))
    for beta in (0.9, 0.95, 0.99):
        opt = Adam(params, lr=1.0, betas=(beta, beta), eps=0.0, momentum_bias_correction=True, compiled=False)
        gen = torch.Generator().manual_seed(3)
        worst = 0.0
        for t in range(300):
            before = params[0].detach().clone()
            # heavy tails and sign-persistent bursts: the sequences that push |u| toward its bound
            g = torch.randn(50, generator=gen, dtype=F64) ** 3 * 10 ** (3 * torch.rand(50, generator=gen, dtype=F64))
            params[0].grad = g.abs() if t % 40 < 10 else g
            opt.step()
            worst = max(worst, (before - params[0].detach()).abs().max().item())
        assert worst <= 1 + 1e-12
        assert worst > 0.9  # the bound is approached, the test is not vacuous
    assert worst_case_bound(0.95, 0.95, 1000) == pytest.approx(1.0)


def test_adamd_first_steps_on_constant_gradient():
    params = [torch.nn.Parameter(torch.zeros(3, dtype=F64))]  # from 0: no cancellation in before - after
    opt = AdamD(params, lr=0.1, betas=(0.9, 0.999), eps=0.0)
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=F64)
    for t in range(1, 11):
        before = params[0].detach().clone()
        params[0].grad = g.clone()
        opt.step()
        moved = (before - params[0].detach()) / torch.sign(g)
        assert_close_rel(moved, torch.full((3,), 0.1 * (1 - 0.9**t), dtype=F64), 1e-14)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(normalize="sign"), "Invalid normalize value: 'sign'"),
        (dict(update_clip=0.0), "Invalid update_clip value: 0.0"),
        (dict(beta2_schedule="cosine"), "Invalid beta2_schedule: 'cosine'"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Adam(make_params(), **kwargs)


def test_invalid_group_value_is_caught_too():
    params = make_params()
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        Adam([{"params": params[:1]}, {"params": params[1:], "lr": -0.5}])


def test_unknown_kwarg_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="amsgrad"):
        Adam(make_params(), amsgrad=True)
    with pytest.raises(TypeError, match="foo"):
        StableAdamW(make_params(), foo=1)


@pytest.mark.parametrize("betas", [(0.99, 0.95), (0.9, 0.81), (0.9, 0.0)])
def test_unstable_betas_refused_with_bound_and_fix(betas):
    with pytest.raises(ValueError) as info:
        Adam(make_params(), betas=betas)
    text = str(info.value)
    assert "B_1000" in text and "beta2 > beta1**2" in text and "allow_unstable_betas=True" in text
    assert ("√t" in text) == (betas == (0.9, 0.81))
    Adam(make_params(), betas=betas, allow_unstable_betas=True)  # opt-in works
    LaProp(make_params(), betas=betas)  # bounded by 1/√(1-β2) whatever β1


@pytest.mark.parametrize("betas", [(0.0, 0.0), (0.0, 0.9)])
def test_no_momentum_is_accepted_for_every_beta2(betas):
    # |u_t| = |g_t|/√v̂_t ≤ 1/√(1-β2): sign descent at β2 = 0, bounded by 1.
    params = make_params()
    opt = Adam(params, betas=betas, momentum_bias_correction=True, eps=0.0, compiled=False)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    if betas[1] == 0.0:
        for p, b in zip(params, before):
            torch.testing.assert_close((b - p) / opt.defaults["lr"], p.grad.sign())


def test_betas_moved_by_a_scheduler_are_checked_at_step():
    params = make_params()
    opt = Adam(params, compiled=False)
    opt.param_groups[0]["betas"] = (0.99, 0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="Unstable betas"):
        opt.step()


def test_sparse_gradient_is_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    p.grad = torch.sparse_coo_tensor([[1]], [1.0], (4,), dtype=F64, check_invariants=True)
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        Adam([p]).step()


# ----------------------------------------------------------------------------- state


def test_state_keys_and_grad_none_skipped():
    params = make_params()
    opt = Adam(params, compiled=False)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    state = opt.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu" and state["step"].ndim == 0
    assert params[1] not in opt.state
    assert set(Adam(make_params(), beta2_schedule="adafactor").state) == set()


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: StableAdamW(ps, weight_decay=0.1, compiled=False),
        lambda ps: Adam(ps, beta2_schedule="adafactor", normalize="laprop", compiled=False),
    ],
)
def test_state_dict_roundtrip_continues_identically(make):
    params = make_params()
    grads = gradient_sequence(params, 20)
    opt = make(params)
    run(opt, params, grads[:10])
    twins = clone_params(params)
    restored = make(twins)
    restored.load_state_dict(roundtrip(opt.state_dict()))
    run(opt, params, grads[10:])
    run(restored, twins, grads[10:])
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_torch_adamw_checkpoint_loads_and_continues_identically():
    params = make_params()
    twins = clone_params(params)
    grads = gradient_sequence(params, 30)
    torch_opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    run(torch_opt, params, grads[:15])
    for p, q in zip(params, twins):
        q.data.copy_(p.data)
    ours = Adam(twins, momentum_bias_correction=True, compiled=False)
    ours.load_state_dict(roundtrip(torch_opt.state_dict()))
    assert ours.param_groups[0]["lr"] == 0.01 and ours.param_groups[0]["normalize"] == "adam"
    run(torch_opt, params, grads[15:])
    run(ours, twins, grads[15:])
    for p, q in zip(params, twins):
        assert_close_rel(q.detach(), p.detach(), 1e-14)


def test_unsupported_torch_checkpoint_is_refused():
    params = make_params()
    torch_opt = torch.optim.AdamW(params, amsgrad=True)
    run(torch_opt, params, gradient_sequence(params, 2))
    with pytest.raises(ValueError, match="amsgrad=True"):
        Adam(clone_params(params)).load_state_dict(torch_opt.state_dict())


# ----------------------------------------------------------------------------- statistics


CONFIGS = [
    dict(normalize="adam", mbc=True, clip=None),
    dict(normalize="adam", mbc=False, clip=1.0),
    dict(normalize="laprop", mbc=True, clip=None),
    dict(normalize="atan2", mbc=True, clip=0.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['normalize']}-mbc{c['mbc']}-clip{c['clip']}")
def test_statistics_equal_tensor_statistics(config):
    params = make_params()
    params[1].data[:2] = 0.0
    grads = gradient_sequence(params, 6, heavy=True)
    for g in grads[:3]:
        g[1][:2] = 0.0  # coordinates without a second moment until step 4: excluded from the jump
    eps = 0.0 if config["normalize"] == "atan2" else 1e-3
    opt = Adam(
        params,
        lr=0.01,
        betas=(0.9, 0.95),
        eps=1e-3,
        weight_decay=0.1,
        compiled=False,
        momentum_bias_correction=config["mbc"],
        normalize=config["normalize"],
        update_clip=config["clip"],
    )
    opt.record_statistics = True
    refs = reference_for(params, grads, lr=0.01, beta1=0.9, beta2=0.95, eps=eps, weight_decay=0.1, **config)
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        assert set(opt.last_statistics) == set(params)
        for k, p in enumerate(params):
            ref = refs[k][t]
            as_tensor = lambda xs: torch.tensor(xs, dtype=F64)  # noqa: E731
            expected = tensor_statistics(
                step_grads[k].flatten(),
                as_tensor(ref["u"]),
                as_tensor(ref["v_hat"]),
                None if ref["v_hat_prev"] is None else as_tensor(ref["v_hat_prev"]),
                eps,
            )
            row = opt.last_statistics[p]
            assert row.dtype == F64 and row.shape == (NUM_STATS,)
            torch.testing.assert_close(row, expected, rtol=1e-12, atol=0)


def test_statistics_dict_is_replaced_and_off_by_default():
    params = make_params()
    opt = Adam(params, compiled=False)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.record_statistics is False and opt.last_statistics == {}
    opt.record_statistics = True
    opt.step()
    first = opt.last_statistics
    params[0].grad, params[1].grad = None, torch.ones_like(params[1])
    opt.step()
    assert opt.last_statistics is not first and set(opt.last_statistics) == {params[1]}


# ----------------------------------------------------------------------------- fast path


def fast_vs_spec(make, dtype, shapes, steps=5, record=True):
    params = make_params(shapes=shapes, dtype=dtype)
    twins = clone_params(params)
    fast, spec = make(params, True), make(twins, False)
    fast.record_statistics = spec.record_statistics = record
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-5, atol=1e-6)
    for _ in run_twins(fast, spec, params, twins, gradient_sequence(params, steps, heavy=True)):
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, **tol)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fast.state[p][key], spec.state[q][key], **tol)
            if record:
                torch.testing.assert_close(
                    fast.last_statistics[p], spec.last_statistics[q], rtol=1e-5 if dtype != F64 else 1e-12, atol=1e-6
                )
    return fast


def test_compiled_step_matches_spec():
    # one compiled configuration in the default run: clip + statistics cover most of the graph.
    # (300, 221) has SMALL + 764 elements: a blocked (k, BLOCK) head whose clipping RMS and
    # statistics add up with those of its tail, stepped in the batch with the small params;
    # a transposed (non-contiguous) param takes the eager route in the same step.
    from adam_monitor._runtime import BLOCK
    from adam_monitor._runtime import STEP_MIN_HEAD_NUMEL as SMALL

    assert 300 * 221 > SMALL and 300 * 221 % BLOCK

    def make(ps, compiled):
        return StableAdamW(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, compiled=compiled)

    params = make_params(shapes=((300, 221), (64, 33), (1,), (7,)), dtype=torch.float32)
    params.append(torch.nn.Parameter(torch.randn(5, 9).t()))
    twins = clone_params(params)
    for q, p in zip(twins, params):
        q.data = p.data.clone(memory_format=torch.preserve_format)
    fast, spec = make(params, True), make(twins, False)
    fast.record_statistics = spec.record_statistics = True
    for _ in run_twins(fast, spec, params, twins, gradient_sequence(params, 4, heavy=True)):
        pass
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(fast.last_statistics[p], spec.last_statistics[q], rtol=1e-5, atol=1e-6)
    assert fast._compiled_steps.enabled is True


def test_in_step_eps_dominance_counts_only_coordinates_with_a_gradient():
    # Embedding tables whose absent tokens get g = 0 exactly. (8330, 8) is a compiled head of 65
    # blocks and a tail of its last 10 rows; its rows, rolled by 24, put rows without a gradient in
    # the head, and tiny (ε-dominated) and no gradients in the tail. (5, 4) is stepped in the batch.
    # The compiled and the eager step count ε-dominated coordinates among those with a gradient.
    from reference import embedding_gradient

    splits = [(8000, 300, 20), (1, 2, 1)]
    params = make_params(shapes=((8330, 8), (5, 4)), dtype=torch.float32)
    twins = clone_params(params)
    gradients = [embedding_gradient(*split) for split in splits]
    rolls = [24, 0]
    grads = [[g(p, t).roll(k, 0) for g, p, k in zip(gradients, params, rolls)] for t in (1, 2, 3)]

    def make(ps, compiled):
        return StableAdamW(ps, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, compiled=compiled)

    fast, spec = make(params, True), make(twins, False)
    fast.record_statistics = spec.record_statistics = True
    for _ in run_twins(fast, spec, params, twins, grads):
        pass
    assert fast._compiled_steps.enabled is True
    for p, q, (signal, tiny, _) in zip(params, twins, splits):
        width = p.shape[1]
        for row in (fast.last_statistics[p], spec.last_statistics[q]):
            assert (row[EPS_COUNT], row[GRAD_COUNT], row[COUNT]) == (tiny * width, (signal + tiny) * width, p.numel())
        torch.testing.assert_close(fast.last_statistics[p], spec.last_statistics[q], rtol=1e-5, atol=1e-6)


def assert_twins_match(fast, spec, params, twins, record):
    tol = dict(rtol=2e-5, atol=1e-6)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **tol)
        if q in spec.state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fast.state[p][key], spec.state[q][key], **tol)
    if record:
        index = {id(p): k for k, p in enumerate(params)} | {id(q): k for k, q in enumerate(twins)}
        assert [index[id(p)] for p in fast.last_statistics] == [
            index[id(q)] for q in spec.last_statistics
        ]  # same order
        for p, q in zip(params, twins):
            if q in spec.last_statistics:
                torch.testing.assert_close(fast.last_statistics[p], spec.last_statistics[q], rtol=1e-5, atol=1e-6)


def test_fast_path_buckets_uneven_heads_and_follows_changing_tensors(monkeypatch):
    # Five heads of uneven sizes (one with a tail) in calls of two (the last padded with a dummy
    # head), small params in the batch, an empty one (eager). Along the way: params without a
    # gradient at some steps (step counts then differ within the group: separate batches, each
    # with its own scalars), statistics switched on and off, params given new storages, a moment
    # replaced, a state loaded from a checkpoint. No step may compile a new graph once each batch
    # shape was seen.
    from torch._dynamo.utils import counters

    from adam_monitor.optim import compiled

    monkeypatch.setattr(compiled, "STEP_HEADS_PER_CALL", 2)
    shapes = ((64, 1024), (65, 1031), (16, 4096), (130, 512), (66, 1024), (7,), (3, 5), (0,))
    params = make_params(shapes=shapes, dtype=torch.float32)
    twins = clone_params(params)

    def make(ps, compiled):
        return Adam(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, momentum_bias_correction=True, compiled=compiled)

    fast, spec = make(params, True), make(twins, False)
    grads = gradient_sequence(params, 12, heavy=True)
    skipped = {2: (3, 4, 5), 3: (3, 4, 5), 6: (5,)}  # step -> params without a gradient
    graphs = None
    for t, step_grads in enumerate(grads):
        record = t % 3 != 1
        fast.record_statistics = spec.record_statistics = record
        for k, (p, q, g) in enumerate(zip(params, twins, step_grads)):
            missing = k in skipped.get(t, ())
            p.grad, q.grad = (None, None) if missing else (g.clone(), g.clone())
        if t == 5:  # new storages (same values): the cached aliases must follow
            for p, q in zip(params[:2], twins[:2]):
                p.data, q.data = p.data.clone(), q.data.clone()
        if t == 7:  # a moment replaced in place of the optimizer (same values)
            fast.state[params[2]]["exp_avg_sq"] = fast.state[params[2]]["exp_avg_sq"].clone()
        if t == 9:  # a checkpoint of the spec, loaded into both: new state tensors
            checkpoint = spec.state_dict()
            fast.load_state_dict(roundtrip(checkpoint))
            spec.load_state_dict(roundtrip(checkpoint))
        fast.step()
        spec.step()
        assert_twins_match(fast, spec, params, twins, record)
        if t == 7:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert fast._compiled_steps.enabled is True and {fast.state[p]["step"].item() for p in params} == {12.0, 10.0, 9.0}


def test_atan2_polynomial_is_within_two_ulp_and_exact_at_special_values():
    from adam_monitor.optim.compiled import atan2_nonnegative_x

    # Ratios |y|/x from 1e-40 to 1e40 (and dense around 1), magnitudes from 1e-30 to 1e30, both signs.
    gen = torch.Generator().manual_seed(0)
    ratio = torch.cat([torch.logspace(-40, 40, 400_001, dtype=F64), torch.rand(400_000, generator=gen, dtype=F64) * 4])
    magnitude = torch.logspace(-30, 30, ratio.numel(), dtype=F64)[torch.randperm(ratio.numel(), generator=gen)]
    x, y = magnitude.float(), (ratio * magnitude).float()
    y = torch.where(torch.rand(y.shape, generator=gen) < 0.5, -y, y)
    keep = (x > 0) & y.isfinite() & (x.isfinite())
    x, y = x[keep], y[keep]
    exact = torch.atan2(y.double(), x.double())
    ulp = 2.0**-23 * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-126))))  # float32 spacing
    error = (atan2_nonnegative_x(y, x).double() - exact).abs() / ulp
    assert error.max() <= 2.0
    assert error.mean() < 0.5

    inf, nan = math.inf, math.nan
    y = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, inf, -inf, 1.0, inf, -inf, 5.0, 1e-45, 3e38, nan, 1.0])
    x = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, inf, inf, inf, 5.0, 1.0, 1e-38, 1.0, nan])
    ours, rounded = (
        atan2_nonnegative_x(y, x),
        torch.atan2(y.double(), x.double()).float(),
    )  # (float32 atan2 is 1 ulp off at π/4)
    torch.testing.assert_close(ours, rounded, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.signbit(), rounded.signbit())  # ±0 kept


def test_compiled_atan2_step_matches_spec():
    # float32 takes the polynomial atan2 in the compiled loops (step and statistics pass).
    def make(ps, compiled):
        return AdamAtan2(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, compiled=compiled)

    fast = fast_vs_spec(make, torch.float32, shapes=((80, 1024), (5, 7)), steps=4)
    assert fast._compiled_steps.enabled is True


def test_default_runs_eager_below_the_compile_threshold():
    params = make_params()
    opt = Adam(params)
    run(opt, params, gradient_sequence(params, 1))
    assert opt._compiled_steps.enabled is False


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("normalize", ["adam", "laprop", "atan2"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("record", [False, True])
def test_compiled_step_matches_spec_all_configurations(dtype, normalize, clip, record):
    def make(ps, compiled):
        return Adam(
            ps,
            lr=0.01,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            normalize=normalize,
            update_clip=clip,
            momentum_bias_correction=True,
            compiled=compiled,
        )

    fast_vs_spec(make, dtype, shapes=((40, 30), (17,)), record=record)


@pytest.mark.slow
def test_compiled_schedule_does_not_recompile_per_step():
    from torch._dynamo.utils import counters

    params = make_params(shapes=((40, 30), (17,), (3, 4, 5)), dtype=torch.float32)
    fast = Adam(params, beta2_schedule="adafactor", compiled=True)
    fast.record_statistics = True
    grads = gradient_sequence(params, 6)
    run(fast, params, grads[:1])  # compiles (or reuses) one graph for all three shapes
    after_first_step = counters["stats"]["unique_graphs"]
    run(fast, params, grads[1:])  # β2_t, c1, c2 change every step: still no new graph
    assert counters["stats"]["unique_graphs"] == after_first_step


# ----------------------------------------------------------------------------- packaging


def test_optim_does_not_import_lightning():
    code = "import sys, adam_monitor.optim; bad = {'lightning', 'pytorch_lightning'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- multi-tensor (GPU) path


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: Adam(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, momentum_bias_correction=True, **kw),
        lambda ps, **kw: AdamD(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, beta2_schedule="adafactor", **kw),
        lambda ps, **kw: LaProp(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, update_clip=1.0, **kw),
        lambda ps, **kw: AdamAtan2(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, **kw),
        lambda ps, **kw: StableAdamW(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, **kw),
    ],
    ids=["Adam", "AdamD-adafactor", "LaProp-clip", "AdamAtan2", "StableAdamW"],
)
def test_multi_tensor_step_matches_spec(monkeypatch, make, dtype):
    # The path compiled=None takes on CUDA without statistics, forced on the CPU here.
    import adam_monitor.optim.adam as adam_module
    from adam_monitor.optim import foreach

    calls = []
    monkeypatch.setattr(adam_module, "FOREACH_DEVICES", ("cpu",))
    monkeypatch.setattr(adam_module, "foreach_step_", lambda *a, **k: calls.append(1) or foreach.foreach_step_(*a, **k))
    params = make_params(shapes=((30, 20), (64,), (1,), (5, 9)), dtype=dtype)
    params.append(torch.nn.Parameter(torch.randn(9, 5, dtype=dtype).t()))  # non-contiguous is fine here
    twins = clone_params(params)
    multi, spec = make(params), make(twins, compiled=False)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-5, atol=1e-6)
    for _ in run_twins(multi, spec, params, twins, gradient_sequence(params, 6, heavy=True)):
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, **tol)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(multi.state[p][key], spec.state[q][key], **tol)
    assert len(calls) == 6
    multi.record_statistics = True  # statistics are computed in the single-tensor or compiled step
    for p in params:
        p.grad = torch.randn_like(p)
    multi.step()
    assert len(calls) == 6 and len(multi.last_statistics) == len(params)


def test_update_clip_is_active_in_the_multi_tensor_test():
    # The clipped variants above must actually clip: heavy-tailed gradient scales make RMS_t > 1.
    params = make_params(shapes=((30, 20), (64,)), dtype=F64)
    opt = StableAdamW(params, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, compiled=False)
    opt.record_statistics = True
    rms = []
    for step_grads in gradient_sequence(params, 6, heavy=True):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        rms += [math.sqrt(row[STALENESS_SQ].item() / row[COUNT].item()) for row in opt.last_statistics.values()]
    assert max(rms) > 1.0, rms


@pytest.mark.parametrize("mbc", [True, False], ids=["Adam", "AdamD"])
def test_torch_kernel_route_matches_plain_loop(monkeypatch, mbc):
    # compiled=None, normalize="adam", no clipping, schedule or statistics: torch's fused AdamW kernel,
    # with the lr and decay rescaled when the momentum is not bias-corrected.
    import adam_monitor.optim.adam as adam_module
    from adam_monitor.optim import foreach

    calls = []
    monkeypatch.setattr(
        adam_module, "torch_fused_step_", lambda *a, **k: calls.append(1) or foreach.torch_fused_step_(*a, **k)
    )
    params = make_params()
    p0 = clone_params(params)
    grads = gradient_sequence(params, 40, heavy=True)
    opt = Adam(params, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, momentum_bias_correction=mbc)
    run(opt, params, grads)
    assert len(calls) == 40
    refs = reference_for(
        p0, grads, lr=0.05, beta1=0.9, beta2=0.99, weight_decay=0.1, mbc=mbc, normalize="adam", eps=1e-8
    )
    for p, q, ref in zip(params, p0, refs):
        assert_follows_reference(p, q, ref, opt.state[p])
        assert opt.state[p]["step"].device.type == "cpu" and opt.state[p]["step"] == 40  # torch's layout kept


def test_torch_kernel_route_follows_group_changes_and_zero_lr(monkeypatch):
    params = make_params(shapes=((4, 3), (6,), (2, 2, 2)), dtype=torch.float32)
    twins = clone_params(params)
    fast, spec = AdamD(grouped(params)), AdamD(grouped(twins), compiled=False)
    for k, step_grads in enumerate(gradient_sequence(params, 12, heavy=True)):
        if k == 6:  # a scheduler moves lr (to 0 in one group) and the betas
            for opt in (fast, spec):
                opt.param_groups[0]["lr"] = 0.0
                opt.param_groups[1]["betas"] = (0.85, 0.99)
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        fast.step()
        spec.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_torch_kernel_refusal_falls_back_to_the_eager_step_once(monkeypatch):
    import adam_monitor.optim.adam as adam_module

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("_fused_adamw_ not implemented for this device")

    monkeypatch.setattr(adam_module, "torch_fused_step_", refuse)
    params = make_params()
    twins = clone_params(params)
    opt, spec = AdamD(params, lr=0.05, weight_decay=0.1), AdamD(twins, lr=0.05, weight_decay=0.1, compiled=False)
    for k, step_grads in enumerate(gradient_sequence(params, 3)):
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        if k == 0:
            with pytest.warns(RuntimeWarning, match="fused AdamW kernel failed"):
                opt.step()
        else:
            opt.step()
        spec.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert len(calls) == 1


def test_multi_tensor_step_runs_in_bounded_chunks(monkeypatch):
    import adam_monitor.optim.adam as adam_module
    from adam_monitor.optim import foreach

    sizes = []
    monkeypatch.setattr(adam_module, "FOREACH_DEVICES", ("cpu",))
    monkeypatch.setattr(adam_module, "FOREACH_CHUNK_NUMEL", 700)
    monkeypatch.setattr(
        adam_module,
        "foreach_step_",
        lambda ps, *a, **k: sizes.append([p.numel() for p in ps]) or foreach.foreach_step_(ps, *a, **k),
    )
    params = make_params(shapes=((30, 20), (64,), (1,), (5, 9), (40, 20)))
    twins = clone_params(params)
    multi, spec = (
        StableAdamW(params, lr=0.01, weight_decay=0.1),
        StableAdamW(twins, lr=0.01, weight_decay=0.1, compiled=False),
    )
    for _ in run_twins(multi, spec, params, twins, gradient_sequence(params, 3, heavy=True)):
        pass
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert sizes[:3] == [[600, 64, 1], [45], [800]]  # runs of at most 700 elements, a larger tensor alone


def test_torchs_fused_keyword_is_refused_naming_compiled():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=r"compiled=True or compiled=False"):
        Adam([p], fused=True)
    with pytest.raises(TypeError, match=r"StableAdamW\(fused=\.\.\.\)"):
        StableAdamW([p], fused=False)
    with pytest.raises(ValueError, match="compiled"):
        Adam([p], compiled="yes")
    assert Adam([p], compiled=False).compiled is False


@pytest.mark.parametrize(
    ("cls", "fixed"),
    [
        (AdamD, {"momentum_bias_correction": False, "normalize": "adam"}),
        (LaProp, {"momentum_bias_correction": True, "normalize": "laprop"}),
        (AdamAtan2, {"momentum_bias_correction": True, "normalize": "atan2", "eps": 0.0}),
        (StableAdamW, {"momentum_bias_correction": True, "normalize": "adam"}),
    ],
)
def test_presets_are_settings_of_the_core(cls, fixed):
    import inspect

    p = torch.nn.Parameter(torch.zeros(3))
    positional = (0.01, (0.8, 0.9), 0.1) if cls is AdamAtan2 else (0.01, (0.8, 0.9), 1e-6, 0.1)
    opt = cls([p], *positional)
    assert {k: opt.defaults[k] for k in fixed} == fixed
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (0.01, (0.8, 0.9), 0.1)
    assert opt.defaults["update_clip"] == (1.0 if cls is StableAdamW else None)
    signature = inspect.signature(cls)
    assert list(signature.parameters)[: len(positional) + 1] == ["params", "lr", "betas"] + (
        ["weight_decay"] if cls is AdamAtan2 else ["eps", "weight_decay"]
    )
    assert not set(fixed) & set(signature.parameters)
    for option, value in fixed.items():
        with pytest.raises(TypeError, match=rf"{cls.__name__} fixes {option}="):
            cls([p], **{option: value})
    with pytest.raises(TypeError, match="positional"):
        cls([p], *positional, 0.5)
    # a preset's state round-trips like any torch optimizer's
    p.grad = torch.ones(3)
    opt.step()
    twin = cls([torch.nn.Parameter(p.detach().clone())], *positional)
    twin.load_state_dict(opt.state_dict())
    assert twin.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert twin.param_groups[0]["normalize"] == fixed["normalize"]
