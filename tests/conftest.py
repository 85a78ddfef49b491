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


def run_greedy_rounds(
    drafter, verifier, prompts: dict, rounds: int, length_of, kept_vocab: int = 16
):
    """Greedy speculative decoding for several users, in process. ``length_of(round, uid)``
    gives each draft length. Returns (server, accepted drafts, drafted tokens); the server's
    ``outputs`` hold every user's committed tokens."""
    import numpy as np

    from multispin_env.live.speculative import DecodingConfig, DrafterSession, VerifierServer

    cfg = DecodingConfig(greedy=True, kept_vocab=kept_vocab)
    server = VerifierServer(verifier, cfg, np.random.default_rng(0))
    devices = {}
    for uid, prompt in prompts.items():
        server.add_user(uid, prompt)
        devices[uid] = DrafterSession(drafter, cfg, np.random.default_rng(1))
        devices[uid].start(prompt)
    accepted = drafted = 0
    for r in range(rounds):
        drafts = {u: d.propose(length_of(r, u)) for u, d in devices.items()}
        for u, (m, committed) in server.verify(drafts).items():
            devices[u].commit(m, committed)
            accepted, drafted = accepted + m, drafted + len(drafts[u].tokens)
    return server, accepted, drafted


# a training run that takes seconds: smoke tests of train -> export/evaluate
TINY_TRAIN_ARGS = [
    "--timesteps",
    "128",
    "--n-envs",
    "2",
    "--eval-freq",
    "0",
    "--checkpoint-freq",
    "0",
    "--no-progress",
    "--params",
    "n_steps:64",
    "batch_size:64",
    "n_epochs:1",
]
