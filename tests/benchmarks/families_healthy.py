"""Healthy families: runs as users train them, which must raise no alert and pass the gate."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from families import Family, Setup

# ------------------------------------------------------------------------------------------------
# real text: character-level Python source from the standard library on disk

_CORPUS_FILES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py", "typing.py")


@functools.cache
def stdlib_text() -> tuple[torch.Tensor, int]:
    """(character ids, vocabulary size) of a few standard-library modules' sources (~340 KB); the
    vocabulary is the bytes that occur, so the ids depend only on the Python install."""
    root = Path(os.__file__).parent
    data = b"".join((root / name).read_bytes() for name in _CORPUS_FILES)
    present = sorted(set(data))
    ids = torch.zeros(256, dtype=torch.long)
    ids[present] = torch.arange(len(present))
    return ids[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()], len(present)


def text_windows(seed: int, steps: int, batch: int, ctx: int):
    """``windows(t) -> (x, y)``: random windows of the corpus for step t (targets shifted by one),
    their positions drawn once from ``seed``."""
    text, _ = stdlib_text()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(text) - ctx - 1, (steps, batch), generator=gen)
    offsets = torch.arange(ctx + 1)

    def windows(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = text[starts[t - 1, :, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:]

    return windows


class PreNormBlock(torch.nn.Module):
    """A GPT-2 block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class NormGPT(torch.nn.Module):
    """A GPT-2-style LM: pre-norm blocks, a final LayerNorm, N(0, 0.02) initialization."""

    def __init__(self, vocab: int, ctx: int, d: int, heads: int, layers: int):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.Sequential(*[PreNormBlock(d, heads) for _ in range(layers)])
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    torch.nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model: torch.nn.Module, windows, vocab: int):
    """``loss(t)``: next-character cross-entropy (in float32) on step t's windows."""

    def loss(t: int) -> torch.Tensor:
        x, y = windows(t)
        return torch.nn.functional.cross_entropy(model(x).float().reshape(-1, vocab), y.reshape(-1))

    return loss


class CharMLP(torch.nn.Module):
    """A Bengio-style character LM (makemore's MLP): the previous ``ctx`` characters' embeddings,
    concatenated, through one tanh layer to next-character logits."""

    def __init__(self, vocab: int, ctx: int, d: int = 16, h: int = 64):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.net = torch.nn.Sequential(torch.nn.Linear(ctx * d, h), torch.nn.Tanh(), torch.nn.Linear(h, vocab))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(self.tok(idx).flatten(1))


def char_mlp_loss(seed: int, steps: int, ctx: int = 8, batch: int = 64):
    """(CharMLP, loss(t)): next-character cross-entropy on random corpus windows, a fresh batch per step."""
    torch.manual_seed(seed)
    _, vocab = stdlib_text()
    model = CharMLP(vocab, ctx)
    windows = text_windows(seed, steps, batch, ctx)

    def loss(t: int) -> torch.Tensor:
        x, y = windows(t)
        return torch.nn.functional.cross_entropy(model(x).float(), y[:, -1])

    return model, loss


def mixture_loss(seed: int, full_batch: bool, d: int = 16, classes: int = 4, h: int = 64):
    """(MLP classifier, loss(t)) on overlapping Gaussian classes (unit noise around N(0, 0.3²) means):
    the loss falls from log(classes) towards the Bayes floor. ``full_batch``: 2,048 fixed points;
    else a fresh batch of 256 per step. ``h = 0``: softmax regression (for equal-covariance classes
    the Bayes classifier is linear)."""
    torch.manual_seed(seed)
    means = 0.3 * torch.randn(classes, d)  # ~1.7 apart against unit noise: the classes overlap
    relu, linear = torch.nn.ReLU, torch.nn.Linear
    model = (
        torch.nn.Sequential(linear(d, h), relu(), linear(h, h), relu(), linear(h, classes)) if h else linear(d, classes)
    )

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,))
        return means[y] + torch.randn(n, d), y

    fixed = sample(2048)

    def loss(t: int) -> torch.Tensor:
        x, y = fixed if full_batch else sample(256)
        return torch.nn.functional.cross_entropy(model(x), y)

    return model, loss


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, steps: int, floor: float = 0.1):
    """An ``after_step``: linear warmup over ``warmup`` steps, then cosine decay to ``floor`` x peak."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return lambda t: scheduler.step()


# ------------------------------------------------------------------------------------------------
# the families


def _gpt_text_run(seed: int, betas: tuple[float, float], eps: float, steps: int = 400) -> Setup:
    torch.manual_seed(seed)
    ctx = 32
    _, vocab = stdlib_text()
    model = NormGPT(vocab, ctx, d=32, heads=2, layers=2)
    loss = lm_loss(model, text_windows(seed, steps, batch=16, ctx=ctx), vocab)
    opt = torch.optim.AdamW(decay_groups(model, 0.1), lr=3e-3, betas=betas, eps=eps)
    return Setup(model, opt, loss, steps=steps, clip=1.0, after_step=warmup_cosine(opt, steps // 10, steps))


def _gpt_text(seed: int, variant: str) -> Setup:
    return _gpt_text_run(seed, betas=(0.9, 0.95), eps=1e-8)


def _gpt_text_torch_betas(seed: int, variant: str) -> Setup:
    return _gpt_text_run(seed, betas=(0.9, 0.999), eps=1e-8)


def _zipf_embedding(seed: int, variant: str) -> Setup:
    steps, batch, bag, vocab, classes = 1000, 64, 16, 4000, 8
    torch.manual_seed(seed)
    teacher = torch.nn.EmbeddingBag(vocab, classes, mode="mean")  # N(0, 1) rows: each token leans to a class
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(vocab, 32, mode="mean"), torch.nn.Linear(32, classes))
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1).double() ** 1.1  # ~370 distinct rows in a step's 1,024 tokens
    tokens = torch.multinomial(zipf, steps * batch * bag, replacement=True, generator=gen).view(steps, batch, bag)
    with torch.no_grad():
        labels = teacher(tokens.flatten(0, 1)).argmax(1).view(steps, batch)

    def loss(t: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(tokens[t - 1]), labels[t - 1])

    return Setup(model, torch.optim.AdamW(model.parameters()), loss, steps=steps)


def _pure_bf16(seed: int, variant: str) -> Setup:
    steps = 800
    model, loss = char_mlp_loss(seed, steps)
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Setup(model, opt, loss, steps=steps)


def _onecycle(seed: int, variant: str) -> Setup:
    steps = 800
    model, loss = mixture_loss(seed, full_batch=False)
    opt = torch.optim.AdamW(model.parameters())  # OneCycleLR sets lr and beta1
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    return Setup(model, opt, loss, steps=steps, after_step=lambda t: scheduler.step())


def _cosine_restarts(seed: int, variant: str) -> Setup:
    steps = 700  # three cycles: 100, 200, 400 steps
    model, loss = char_mlp_loss(seed, steps)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=100, T_mult=2)
    return Setup(model, opt, loss, steps=steps, after_step=lambda t: scheduler.step())


def _eps_1e6_converging(seed: int, variant: str) -> Setup:
    model, loss = mixture_loss(seed, full_batch=True, h=0)  # convex: a single minimum to converge to
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-6)
    return Setup(model, opt, loss, steps=1000)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt_text",
            True,
            "pre-norm char-level GPT on Python stdlib source, AdamW betas (0.9, 0.95), weight decay 0.1, "
            "warmup + cosine, clip 1.0: the standard LM recipe, loss falls smoothly",
            _gpt_text,
        ),
        Family(
            "gpt_text_torch_betas",
            True,
            "gpt_text with PyTorch's default betas (0.9, 0.999) and eps 1e-8, as most users leave them: "
            "v-hat averages over ~1,000 steps instead of ~20, on the same smoothly falling loss",
            _gpt_text_torch_betas,
        ),
        Family(
            "zipf_embedding",
            True,
            "EmbeddingBag + linear classifier on Zipf(1.1) bags of a 4,000-token vocabulary, default AdamW: "
            "~90% of the rows get a zero gradient in a step and their moments just decay; loss falls steadily",
            _zipf_embedding,
        ),
        Family(
            "pure_bf16",
            True,
            "character MLP LM with bfloat16 parameters and optimizer state, AdamW lr 1e-3: updates under "
            "half a weight's bf16 ulp round away, which slows learning but does not destabilize it",
            _pure_bf16,
        ),
        Family(
            "onecycle",
            True,
            "MLP on overlapping Gaussian classes, fresh batches, AdamW under OneCycleLR (max lr 1e-2, default "
            "cycle_momentum: beta1 0.95 -> 0.85 -> 0.95 against lr): loss falls to the Bayes floor",
            _onecycle,
        ),
        Family(
            "cosine_restarts",
            True,
            "character MLP LM, Adam lr 3e-3 under CosineAnnealingWarmRestarts (T_0 100, T_mult 2): each "
            "restart returns the lr to its peak; the loss pauses there, it does not jump",
            _cosine_restarts,
        ),
        Family(
            "eps_1e6_converging",
            True,
            "full-batch softmax regression on overlapping Gaussian classes (convex), Adam lr 1e-3, eps 1e-6: "
            "converges to its minimum and flattens there",
            _eps_1e6_converging,
        ),
    )
}
