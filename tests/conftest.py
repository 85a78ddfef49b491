import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import copy  # noqa: E402

import pytest  # noqa: E402


def make_tiny_pair(vocab: int = 48, seed: int = 0, noise: float = 0.4, n_positions: int = 512):
    """A random verifier with peaked predictions and a drafter that is a noisy copy of it,
    so that the two agree often but not always (tests of speculative decoding)."""
    import torch

    from multispin_env.live.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    verifier = GPT(
        GPTConfig(vocab_size=vocab, n_positions=n_positions, n_layer=2, n_embd=32, n_head=4)
    )
    with torch.no_grad():
        for p in verifier.parameters():
            p.mul_(6.0)
    drafter = copy.deepcopy(verifier)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return drafter.eval(), verifier.eval()


@pytest.fixture
def tiny_pair_factory():
    return make_tiny_pair
