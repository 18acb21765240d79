"""The float64 oracles of the statistics, once: a per-coordinate loop written straight from the
definitions (DESIGN §2), and the one-tensor specification applied to stored torch-Adam state.
The fast paths are tested against these; ``tensor_statistics`` itself against the loop."""

from __future__ import annotations

import math

import torch

from adam_monitor.diagnostics import adam_direction, previous_second_moment, tensor_statistics


def reference_row(g, m, v, v_prev, *, beta1, beta2, eps, t, v_den=None):
    """One statistics row from plain Python floats, one coordinate at a time."""
    c1, c2 = 1 - beta1**t, 1 - beta2**t
    c2p = 1 - beta2 ** (t - 1)
    v_den = v if v_den is None else v_den
    upd = stale = jump = 0.0
    njump = neps = ngrad = 0
    for gi, mi, vi, vpi, vdi in zip(g, m, v, v_prev, v_den):
        u = (mi / c1) / (math.sqrt(vdi / c2) + eps)
        upd += u * u
        stale += gi * gi / max(vi / c2, eps * eps)
        if t > 1 and vpi > 0:
            jump += gi * gi / max(vpi / c2p, eps * eps)
            njump += 1
        if gi != 0:  # ε-dominance is a fraction of the coordinates that got a gradient
            neps += math.sqrt(vdi / c2) <= eps
            ngrad += 1
    return [upd, stale, jump, njump, neps, ngrad, len(g)]


def specification(lists, kw):
    """Rows of ``tensor_statistics`` in float64 from stored state ``(grads, exp_avgs, exp_avg_sqs)``
    and the keywords of ``adam_statistics`` (``max_exp_avg_sqs`` under amsgrad). v_{t-1} is rebuilt
    from v_t in the state's own precision, as every path must (the state holds nothing else)."""
    t, b1, b2, eps = kw["step"], kw["beta1"], kw["beta2"], kw["eps"]
    c2, c2p = 1 - b2**t, 1 - b2 ** (t - 1)
    maxes = kw.get("max_exp_avg_sqs")
    rows = []
    for i, (g, m, v) in enumerate(zip(*lists)):
        v_den = maxes[i] if maxes is not None else v
        u = adam_direction(m.double(), v_den.double(), bias_correction1=1 - b1**t, bias_correction2=c2, eps=eps)
        cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
        prev = previous_second_moment(v.to(cdt), g.to(cdt), b2).double() / c2p if t > 1 and b2 > 0 else None
        rows.append(tensor_statistics(g, u, v.double() / c2, prev, eps, v_den.double() / c2))
    return torch.stack(rows)


def torch_adam_state(shapes, dtype, *, steps, amsgrad=False, eps=1e-8, betas=(0.9, 0.999), gradient=None):
    """Step torch Adam ``steps`` times; returns ``(lists, kw)`` for ``adam_statistics(*lists, **kw)``.

    ``gradient(param, t)`` makes each step's gradient (default: standard normal)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    opt = torch.optim.Adam(params, betas=betas, eps=eps, amsgrad=amsgrad)
    for t in range(1, steps + 1):
        for p in params:
            p.grad = gradient(p, t) if gradient is not None else torch.randn_like(p)
        opt.step()
    states = [opt.state[p] for p in params]
    lists = ([p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
    kw = dict(beta1=betas[0], beta2=betas[1], eps=eps, step=steps)
    if amsgrad:
        kw["max_exp_avg_sqs"] = [s["max_exp_avg_sq"] for s in states]
    return lists, kw


def embedding_gradient(signal: int, tiny: int, once: int):
    """``gradient(param, t)`` for :func:`torch_adam_state` of embedding tables ``(vocab, dim)``, as
    token rows: rows ``[0, signal)`` get gradients of order 1 at every step, the next ``tiny`` rows
    of order 1e-12 (ε-dominated under ε = 1e-8), the next ``once`` rows one at the first step only,
    the rest none ever (v = 0). A row without a gradient has g = 0 exactly, as an embedding's
    backward leaves the rows of tokens absent from the batch. After the first step
    ``eps_dominance = tiny / (signal + tiny)``: the rows with g = 0 count nowhere."""

    def gradient(p, t):
        g = torch.zeros_like(p)
        g[:signal] = 1 + torch.rand_like(g[:signal])
        g[signal : signal + tiny] = 1e-12 * (1 + torch.rand_like(g[signal : signal + tiny]))
        if t == 1:
            g[signal + tiny : signal + tiny + once] = 1 + torch.rand_like(g[signal + tiny : signal + tiny + once])
        return g

    return gradient
