"""Low-bit Adams (torchao's 8-bit, 4-bit and FP8 AdamW, bitsandbytes' 8-bit and 32-bit AdamW), read
from their dequantized state.

Their moments live in low-bit codes with one scale per block (bitsandbytes: ``state1``/``state2``);
the step computes the new moments in float from the dequantized old ones and the gradient, steps
with them, and then rounds them back into the codes. So the update check rebuilds the step from the moments before it (exact
to float rounding), and the rows, read from the codes after it, hold the step to the codes'
resolution. FP8's block scale flushes a block's small second moments to 0: refused.
"""

import warnings

import pytest
import torch

from adam_monitor import Monitor
from adam_monitor.alerts import InstabilityWarning
from adam_monitor.diagnostics.rows import COUNT, UPDATE_SQ
from adam_monitor.engine.moments import dequantized, low_bit, state_dtype
from adam_monitor.engine.reader import StepReader, UnsupportedOptimizer

ao = pytest.importorskip("torchao.optim")
bnb = pytest.importorskip("bitsandbytes")

LR = 1e-3


def params():
    torch.manual_seed(0)
    # torchao quantizes tensors of 4096 elements or more and keeps smaller ones in float32
    return [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(5))]


def train(opt, ps, steps, reader=None, spread=0.0):
    """Per step: (rows, step, unverified) of ``reader`` (if given) and each tensor's applied update
    over the lr, decoupled decay taken out. Gradient coordinates spread over ``spread`` decades of scale."""
    kept = 1 - LR * opt.param_groups[0].get("weight_decay", 0.0)  # decoupled decay (bitsandbytes' Adam too)
    out = []
    for t in range(1, steps + 1):
        for p in ps:
            scale = 10 ** (-spread * torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
            p.grad = torch.randn_like(p) * scale * (1 + t % 5) * 1e-2
        before = [p.detach().clone() for p in ps]
        opt.step()
        applied = [(kept * b.double() - p.detach().double()) / LR for b, p in zip(before, ps)]
        out.append(((*reader.read(), reader.unverified) if reader is not None else None, applied))
    return out


#: name -> (make, the codes' resolution of update_rms measured here, whether the big tensor is low-bit)
LOW_BIT = {
    "torchao.AdamW8bit": (lambda ps: ao.AdamW8bit(ps, lr=LR, weight_decay=0.0), 1e-3, True),
    "torchao.AdamW4bit": (lambda ps: ao.AdamW4bit(ps, lr=LR, weight_decay=0.0), 2e-2, True),
    "bitsandbytes.AdamW8bit": (lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=0.0), 1e-3, True),
    "bitsandbytes.Adam8bit-decay": (lambda ps: bnb.optim.Adam8bit(ps, lr=LR, weight_decay=1e-2), 1e-3, True),
    "bitsandbytes.PagedAdamW8bit": (lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=LR, weight_decay=0.0), 1e-3, True),
    "bitsandbytes.AdamW": (lambda ps: bnb.optim.AdamW(ps, lr=LR, weight_decay=0.0), 0.0, False),
}


@pytest.mark.parametrize("name", LOW_BIT)
def test_low_bit_adamw_is_read_to_its_resolution(name):
    make, resolution, coded = LOW_BIT[name]
    ps = params()
    opt = make(ps)
    reader = StepReader(opt)
    for t, ((rows, step, unverified), applied) in enumerate(train(opt, ps, 40, reader), start=1):
        assert step == t and unverified == (t == 1)
        if t == 1:
            continue  # not recorded (what the update is shows from the second step)
        assert low_bit(opt.state[ps[0]]) == coded and not low_bit(opt.state[ps[1]])
        for i, u in enumerate(applied):
            read = (rows[i, UPDATE_SQ] / rows[i, COUNT]).sqrt()
            true = u.square().mean().sqrt()
            # the low-bit tensor to the codes' resolution; the full-precision one to float32's rounding of p
            rounding = 4 * torch.finfo(torch.float32).eps * ps[i].detach().abs().max() / (LR * true)
            tolerance = resolution if i == 0 and coded else float(rounding)
            assert abs(read / true - 1) <= tolerance, (t, i, float(read), float(true))


def test_low_bit_state_sets_the_rounding_margin_of_the_bound_test():
    ps = params()
    for make, dtype in [
        (ao.AdamW8bit, torch.bfloat16),
        (ao.AdamW4bit, torch.float8_e4m3fn),
        (bnb.optim.AdamW8bit, torch.bfloat16),
        (bnb.optim.AdamW, torch.float32),
    ]:
        opt = make(ps, lr=LR)
        train(opt, ps, 1)
        assert state_dtype(opt.state[ps[0]], torch.float32) == dtype
        assert state_dtype(opt.state[ps[1]], torch.float64) == torch.float32


def test_fp8_state_that_flushes_second_moments_is_refused():
    # Gradients over 4 decades within a block: g² spans 8, beyond what FP8 codes under one scale hold.
    ps = params()
    opt = ao.AdamWFp8(ps, lr=LR)
    reader = StepReader(opt)
    with pytest.raises(UnsupportedOptimizer, match=r"low-bit state of AdamWFp8 does not hold the moments .* step 2,"):
        train(opt, ps, 2, reader, spread=4.0)


def test_fp8_state_is_read_where_its_codes_hold_the_moments():
    ps = params()
    opt = ao.AdamWFp8(ps, lr=LR, weight_decay=0.0)
    reader = StepReader(opt)
    for t, ((rows, _, _), applied) in enumerate(train(opt, ps, 20, reader), start=1):
        if t > 1:
            read = (rows[0, UPDATE_SQ] / rows[0, COUNT]).sqrt()
            assert abs(read / applied[0].square().mean().sqrt() - 1) <= 2e-2


def test_monitor_reads_low_bit_adamw_without_dropping_it():
    ps = params()
    opt = ao.AdamW8bit(ps, lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        warnings.filterwarnings("ignore", message=".*script_method.*")
        warnings.filterwarnings("ignore", category=InstabilityWarning)  # the gradients' scale cycles
        monitor = Monitor(opt, named_parameters=[("w", ps[0]), ("b", ps[1])])
        train(opt, ps, 30)
        metrics = monitor.compute()
    (tracked,) = monitor._tracked
    assert metrics["adam/update_rms"] > 0 and (tracked.applied, tracked.unverified) == (29, 1)
    assert monitor._unmonitored == []
    monitor.close()


class SignAdamW8bit(ao.AdamW8bit):
    """An update torchao's codes would hold, but not Adam's: the sign of the step."""

    def step(self, closure=None):
        before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        super().step(closure)
        with torch.no_grad():
            for b, p in zip(before, (p for g in self.param_groups for p in g["params"])):
                p.copy_(b - LR * torch.sign(b - p))


def test_a_low_bit_optimizer_with_another_update_is_refused():
    ps = params()
    opt = SignAdamW8bit(ps, lr=LR, weight_decay=0.0)
    reader = StepReader(opt)
    with pytest.raises(UnsupportedOptimizer, match="update is not Adam's"):
        train(opt, ps, 3, reader)


def test_bitsandbytes_codes_dequantize_as_its_own_function_does():
    torch.manual_seed(0)
    for numel in (4096, 5000, 70_000):  # whole blocks, a last partial block, many blocks
        p = torch.nn.Parameter(torch.randn(numel))
        opt = bnb.optim.AdamW8bit([p], lr=LR)
        p.grad = torch.randn_like(p) * torch.logspace(-4, 0, numel)
        opt.step()
        state = opt.state[p]
        ours = dequantized(state)
        for name, (codes, qmap, absmax) in [
            ("exp_avg", ("state1", "qmap1", "absmax1")),
            ("exp_avg_sq", ("state2", "qmap2", "absmax2")),
        ]:
            theirs = bnb.functional.dequantize_blockwise(
                state[codes], absmax=state[absmax], code=state[qmap], blocksize=256
            )
            torch.testing.assert_close(ours[name], theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torchao.AdamW8bit", "bitsandbytes.AdamW8bit"])
def test_a_read_keeps_no_dequantized_moments_alive(name, monkeypatch):
    """A low-bit state is dequantized for each read, and the float32 copies (as large as the
    parameters, on an optimizer chosen to save that memory) go once the read is done."""
    import gc
    import weakref

    import adam_monitor.engine.reader as reader_module

    made = []

    def recorded(state):
        out = dequantized(state)
        kept = [id(t) for t in state.values()]
        made.extend(weakref.ref(out[k]) for k in ("exp_avg", "exp_avg_sq") if k in out and id(out[k]) not in kept)
        return out

    monkeypatch.setattr(reader_module, "dequantized", recorded)
    ps = params()
    opt = LOW_BIT[name][0](ps)
    reader = StepReader(opt)
    train(opt, ps, 4, reader)
    gc.collect()
    assert made and all(t() is None for t in made)
    rows, _ = StepReader(opt).read()  # a fresh reader's read still finds the codes of the last step
    assert rows[0, COUNT] == 64 * 64


@pytest.mark.parametrize("name", ["torchao.AdamW8bit", "bitsandbytes.AdamW8bit"])
def test_a_read_dequantizes_a_few_tensors_at_a_time(name, monkeypatch):
    """The float32 copies of a read are those of a piece of the model (here one tensor, and the
    piece before it until the next is made), with the rows of a read that dequantizes all at once."""
    import weakref

    import adam_monitor.engine.reader as reader_module

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(6)]
    opt = LOW_BIT[name][0](ps)
    train(opt, ps, 3)
    whole, _ = StepReader(opt).read()
    made, most = [], 0

    def recorded(state):
        nonlocal most
        out = dequantized(state)
        kept = [id(t) for t in state.values()]
        made.extend(weakref.ref(out[k]) for k in ("exp_avg", "exp_avg_sq") if id(out[k]) not in kept)
        most = max(most, sum(t() is not None for t in made))
        return out

    monkeypatch.setattr(reader_module, "dequantized", recorded)
    monkeypatch.setattr(reader_module, "DEQUANTIZED_NUMEL", 64 * 64)
    pieces, _ = StepReader(opt).read()
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)
    assert len(made) == 12 and most <= 4, most
