"""The parameter shapes both benchmarks use: a small transformer's tensors, about 20M parameters."""

from __future__ import annotations


def transformer_shapes(scale: float = 1.0, blocks: int = 5) -> list[tuple[int, ...]]:
    """Embedding, ``blocks`` blocks (qkv, proj, two MLP matrices, biases, two norms), final norm.

    At scale 1 and 5 blocks: 24.0M parameters in 63 tensors.
    """
    d, vocab = int(512 * scale), int(16000 * scale)
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]
