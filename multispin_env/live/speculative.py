"""Exact multi-user speculative decoding: per-user drafting, one batched verification.

Devices draft with their own model and KV cache and upload, per drafted token, the token and
a truncated PMF: the top ``kept_vocab`` probabilities (``prob_bits`` each, fp16 for 16) and
their indices, as in the paper's payload model (Eq. 9). The device samples from exactly that
uploaded distribution (top-k truncation, fp16 quantisation, renormalisation), and the server
renormalises the same fp16 numbers the same way, so the standard rule stays exact:

- sampling: accept draft x_i with probability min(1, p_i(x) / q_i(x)); at the first
  rejection, sample from norm(max(0, p_i - q_i)); if all L are accepted, sample a bonus
  token from p_{L+1}. The output is distributed exactly as the verifier's p (Leviathan et al.
  2023, Chen et al. 2023).
- greedy: accept while the draft equals the verifier's argmax, then append the verifier's
  argmax: the output equals the verifier's own greedy decoding.

The server verifies every user's ``[pending..., x_1..x_L]`` in one padded forward of the
verifier over the users' own KV caches (:meth:`GPT.forward_cached`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from multispin_env.live.gpt import GPT, Cache, cache_crop


@dataclass(frozen=True)
class DecodingConfig:
    """How tokens are drafted and verified.

    Attributes:
        greedy: argmax drafting and verification (deterministic) instead of sampling.
        temperature: softmax temperature of both models when sampling.
        kept_vocab: |V_kept|, probabilities uploaded per drafted token (top-k).
    """

    greedy: bool = False
    temperature: float = 1.0
    kept_vocab: int = 1024

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.kept_vocab < 1:
            raise ValueError(f"kept_vocab={self.kept_vocab} must be >= 1")


@dataclass
class Draft:
    """What a device uploads for one round: L tokens and their truncated PMFs."""

    tokens: list[int]
    q_indices: np.ndarray  # (L, kept) int32
    q_values: np.ndarray  # (L, kept) float16, the drafter's truncated, quantised PMF

    def payload_bits(self, vocab_size: int, prob_bits: int = 16) -> int:
        """Eq. (9): |V_kept| (Q_B + ceil(log2 V)) bits per drafted token."""
        index_bits = int(np.ceil(np.log2(vocab_size)))
        return len(self.tokens) * self.q_indices.shape[1] * (prob_bits + index_bits)


def truncated_pmf(logits: torch.Tensor, cfg: DecodingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(indices, fp16 values) of the top-k of softmax(logits / T): the uploaded PMF."""
    probs = torch.softmax(logits.double() / cfg.temperature, dim=-1)
    k = min(cfg.kept_vocab, probs.shape[-1])
    values, indices = torch.topk(probs, k)
    values = values / values.sum()
    return indices.numpy().astype(np.int32), values.numpy().astype(np.float16)


def uploaded_distribution(indices: np.ndarray, values: np.ndarray, vocab: int) -> np.ndarray:
    """The dense distribution the device sampled from, as both ends compute it."""
    q = np.zeros(vocab)
    v = values.astype(np.float64)
    q[indices] = v / v.sum()
    return q


def _sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    return sample_index(probs, rng.random())


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from (unnormalised) ``probs`` with the uniform ``u`` in [0, 1)."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))


def draft_uniforms(sample_seed: int, length: int) -> np.ndarray:
    """The uniforms a device draws its L tokens with in sampling mode, from the server's
    per-round ``sample_seed``. Token i is ``indices[i][sample_index(values[i], u_i)]`` of its
    own uploaded PMF, so the server can recompute it: a device cannot draft a token its
    uploaded distribution would not have given (with a tiny q(x) the acceptance test
    min(1, p/q) would otherwise pass almost surely, and a device could write any text).
    Given honest draws from q, the output is distributed exactly as the verifier's p for
    *any* q. The check stops a device from naming arbitrary tokens, but not one that shapes
    q around the uniforms it already knows (see :mod:`multispin_env.live.validation`)."""
    return np.random.default_rng(int(sample_seed)).random(length)


def accept(
    p_rows: np.ndarray, draft: Draft, cfg: DecodingConfig, rng: np.random.Generator
) -> tuple[int, list[int]]:
    """Apply the acceptance rule. ``p_rows`` is ``(L + 1, V)``: the verifier's distribution
    at each drafted position and after the last one. Returns (accepted drafts m, committed
    tokens: the m accepted drafts plus one corrected or bonus token)."""
    tokens = draft.tokens
    if cfg.greedy:
        m = 0
        while m < len(tokens) and tokens[m] == int(np.argmax(p_rows[m])):
            m += 1
        return m, tokens[:m] + [int(np.argmax(p_rows[m]))]
    vocab = p_rows.shape[1]
    for i, x in enumerate(tokens):
        q = uploaded_distribution(draft.q_indices[i], draft.q_values[i], vocab)
        p = p_rows[i]
        if rng.random() * q[x] < p[x]:  # accept with probability min(1, p(x)/q(x))
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        fix = _sample(residual / total if total > 0 else p, rng)
        return i, tokens[:i] + [fix]
    return len(tokens), tokens + [_sample(p_rows[len(tokens)], rng)]


def verifier_probs(logits: torch.Tensor, cfg: DecodingConfig) -> np.ndarray:
    if cfg.greedy:
        return logits.double().numpy()  # only the argmax is used
    return torch.softmax(logits.double() / cfg.temperature, dim=-1).numpy()


@dataclass
class DrafterSession:
    """A device: its drafter, its KV cache and the committed tokens not yet in the cache."""

    model: GPT
    cfg: DecodingConfig
    rng: np.random.Generator
    cache: Cache | None = None
    pending: list[int] = field(default_factory=list)

    def start(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        self.cache, self.pending = None, list(prompt)

    def _cache_len(self, cache: Cache | None) -> int:
        return 0 if cache is None else cache[0][0].shape[1]

    def propose(self, length: int, uniforms=None, stop_threshold: float = 0.0) -> Draft:
        """Draft up to ``length`` tokens, one drafter forward each; the first forward also
        feeds the committed tokens the cache does not hold yet. In sampling mode token i is
        drawn with ``uniforms[i]`` when given (the server's, see :func:`draft_uniforms`),
        else with this session's own generator. With ``stop_threshold`` > 0 the draft stops
        early (AdaEDL's rule, see :meth:`next_token`)."""
        self.begin(length, uniforms, stop_threshold)
        while self.next_token() is not None:
            pass
        return self.end()

    def begin(self, length: int, uniforms=None, stop_threshold: float = 0.0) -> None:
        """Start a draft that :meth:`next_token` grows one token at a time (streaming)."""
        if length < 1:
            raise ValueError(f"draft length {length} must be >= 1")
        if not 0.0 <= stop_threshold < 1.0:
            raise ValueError(f"stop_threshold={stop_threshold} must be in [0, 1)")
        self._base, self._num_pending, self._length = (
            self._cache_len(self.cache),
            len(self.pending),
            length,
        )
        self._uniforms, self._stop_threshold = uniforms, float(stop_threshold)
        self._feed, self._work_cache = self.pending, self.cache
        self._tokens, self._idx_rows, self._val_rows = [], [], []
        self._fed = 0  # drafted tokens already fed to the drafter (held by its cache)
        self.stopped_early = False

    def next_token(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Draft the next token: (token, PMF indices, PMF values), or None when the draft is
        over (the length is reached, or early stop: from the second token on, the draft
        ends when the drafter's top probability for the next token is below the threshold;
        the forward that measured it is kept in the cache, so it is not wasted)."""
        i = len(self._tokens)
        if i >= self._length:
            return None
        logits, caches = self.model.forward_cached([self._feed], [self._work_cache])
        self._work_cache = caches[0]
        if i > 0:
            self._fed = i
        last = logits[0][-1]
        if i > 0 and self._stop_threshold > 0.0:
            top = float(torch.softmax(last.double() / self.cfg.temperature, dim=-1).max())
            if top < self._stop_threshold:
                self.stopped_early = True
                self._length = i
                return None
        indices, values = truncated_pmf(last, self.cfg)
        if self.cfg.greedy:
            x = int(torch.argmax(last))
        else:
            u = self.rng.random() if self._uniforms is None else float(self._uniforms[i])
            x = int(indices[sample_index(values, u)])
        self._tokens.append(x)
        self._idx_rows.append(indices)
        self._val_rows.append(values)
        self._feed = [x]
        return x, indices, values

    def end(self, keep: int | None = None) -> Draft:
        """The draft so far, or its first ``keep`` tokens (a deadline cut the rest)."""
        n = len(self._tokens) if keep is None else min(int(keep), len(self._tokens))
        self._length = n
        self._fed = min(self._fed, n)
        # the cache holds: old cache + pending + the first _fed drafted tokens
        self._proposal_cache = self._work_cache
        return Draft(
            self._tokens[:n],
            np.stack(self._idx_rows[:n]) if n else np.zeros((0, 0), np.int32),
            np.stack(self._val_rows[:n]) if n else np.zeros((0, 0), np.float16),
        )

    def commit(self, accepted: int, committed: list[int]) -> None:
        """Keep the cached prefix that is now committed (pending + accepted drafts that were
        fed); the remaining committed tokens become pending for the next round."""
        fed = min(accepted, self._fed)
        self.cache = cache_crop(self._proposal_cache, self._base + self._num_pending + fed)
        self.pending = list(committed[fed:])

    # ------------------------------------------------ proactive drafting (SpecEdge)
    # While its draft is verified, a device drafts its next draft ahead from the guess that
    # the whole draft is accepted and the verifier's bonus token is the drafter's own top
    # token there. The guessed context is committed only if the result says so; otherwise
    # the state from before the guess comes back and the result is committed as usual. An
    # ahead draft is an ordinary draft (begin / next_token) started early, so the tokens and
    # PMFs it uploads are those the device would draft after the round message (tested).

    @property
    def drafted(self) -> int:
        """Tokens of the current draft so far."""
        return len(self._tokens)

    def begin_ahead(self, max_tokens: int, uniforms=None) -> bool:
        """After :meth:`end`: feed the draft's last token, take the drafter's argmax as the
        guessed bonus token and begin a draft of up to ``max_tokens`` on that guessed context.
        False (nothing begun) when the draft is empty."""
        n = self._length
        if n < 1:
            return False
        saved = (self.cache, self.pending, self._proposal_cache, self._base)
        self._ahead_saved = (*saved, self._num_pending, self._fed, list(self._tokens[:n]))
        # the cache may hold the last token already (a cut draft, an early stop's forward)
        # but not the logits after it: feed it again on the cache without it
        fed = min(self._fed, n - 1)
        cache = cache_crop(self._proposal_cache, self._base + self._num_pending + fed)
        logits, caches = self.model.forward_cached([self._tokens[fed:n]], [cache])
        self._guess = int(torch.argmax(logits[0][-1]))
        self.cache, self.pending = caches[0], [self._guess]
        self.begin(max_tokens, uniforms, 0.0)
        return True

    def resolve_ahead(self, accepted: int, committed: list[int]) -> bool:
        """The verification result of the draft :meth:`begin_ahead` guessed from. True: the
        guess held (every token accepted, bonus = guess), the ahead draft goes on from the
        committed context. False: the guessed state is dropped, the result committed."""
        cache, pending, proposal, base, num_pending, fed, tokens = self._ahead_saved
        self._ahead_saved = None
        if accepted == len(tokens) and list(committed) == tokens + [self._guess]:
            return True
        self.cache, self.pending = cache, pending
        self._proposal_cache, self._base, self._num_pending, self._fed = (
            proposal,
            base,
            num_pending,
            fed,
        )
        self.commit(accepted, committed)
        return False

    def drop_ahead(self) -> None:
        """Forget an unresolved guess (its draft got no result): back to the committed
        state from before it."""
        if getattr(self, "_ahead_saved", None) is not None:
            self.cache, self.pending = self._ahead_saved[:2]
            self._ahead_saved = None

    def finish_ahead(self, length: int) -> Draft:
        """The round message came: the ahead draft becomes this round's draft of ``length``
        tokens (cut if more were drafted ahead, else drafted on to ``length``)."""
        if length < 1:
            raise ValueError(f"draft length {length} must be >= 1")
        if self.drafted >= length:
            return self.end(keep=length)
        self._length = length
        while self.next_token() is not None:
            pass
        return self.end()


@dataclass
class VerifierServer:
    """The edge server's verifier with one KV cache per user.

    Each user's cache holds every committed token except the newest, which is pending and is
    fed together with the next draft.
    """

    model: GPT
    cfg: DecodingConfig
    rng: np.random.Generator
    caches: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def add_user(self, uid, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        self.caches[uid], self.pending[uid], self.outputs[uid] = None, list(prompt), []

    def remove_user(self, uid) -> None:
        for table in (self.caches, self.pending, self.outputs):
            table.pop(uid, None)

    def verify(self, drafts: dict) -> dict:
        """Verify all users' drafts in ONE batched verifier forward.

        Returns {uid: (accepted m, committed tokens)}; the committed tokens are appended to
        ``outputs[uid]``, the server's record of each user's generated text.
        """
        uids = list(drafts)
        feeds = [self.pending[u] + drafts[u].tokens for u in uids]
        logits, caches = self.model.forward_cached(feeds, [self.caches[u] for u in uids])
        results = {}
        for u, rows, cache in zip(uids, logits, caches, strict=True):
            n_pending, draft = len(self.pending[u]), drafts[u]
            p_rows = verifier_probs(rows[n_pending - 1 :], self.cfg)  # (L + 1, V)
            m, committed = accept(p_rows, draft, self.cfg, self.rng)
            old = 0 if self.caches[u] is None else self.caches[u][0][0].shape[1]
            self.caches[u] = cache_crop(cache, old + n_pending + m)
            self.pending[u] = [committed[-1]]
            self.outputs[u].extend(committed)
            results[u] = (m, committed)
        return results


def verifier_greedy_reference(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """The verifier's own greedy continuation (what greedy speculative decoding must equal)."""
    out, cache, feed = [], None, list(prompt)
    for _ in range(new_tokens):
        logits, caches = model.forward_cached([feed], [cache])
        cache = caches[0]
        feed = [int(torch.argmax(logits[0][-1]))]
        out.append(feed[0])
    return out
