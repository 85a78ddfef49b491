"""A permutation-equivariant actor-critic for per-user allocation (SB3 policy).

Why: the right draft length for user k depends on user k's own features (acceptance, speed,
channel) and on a shared quantity (the round's latency budget), the same way for every user.
A flat MLP over K x F inputs must learn that K times; here one small network encodes every
user, mean and max pooling give the shared context, and one per-user head maps
[own embedding, context] to that user's action (DeepSets, Zaheer et al. 2017). Relabelling the
users permutes the actions the same way, and the same weights serve any number of users.

Supported action modes (``multispin_env.action_codec``): ``lengths`` (1 output per user),
``full`` (length and bandwidth logit per user), ``lengths_discrete`` (L_max logits per user).
Observations must be the raw builder output (its first per-user feature is the 0/1 active
flag used for masked pooling): train with ``normalize: "{'norm_obs': False, ...}"``.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from multispin_env.observation import GLOBAL_FEATURES, USER_FEATURES


def _mlp(sizes: list[int], activation=nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class PerUserNetwork(nn.Module):
    """Shared per-user encoder + pooled context -> per-user actor outputs and a critic latent."""

    def __init__(
        self,
        max_users: int,
        user_features: int,
        outputs_per_user: int,
        hidden: int = 64,
        activation=nn.Tanh,
        global_features: int = len(GLOBAL_FEATURES),
        global_outputs: int = 0,
        block_major: bool | None = None,
    ) -> None:
        super().__init__()
        self.max_users, self.user_features = max_users, user_features
        self.outputs_per_user = outputs_per_user
        self.global_outputs = global_outputs
        # Box actions are laid out per output (all users' first output, then all users'
        # second...); MultiDiscrete logits per user (old default: block-major only for 2)
        self.block_major = outputs_per_user == 2 if block_major is None else block_major
        g = global_features
        self.encoder = _mlp([user_features + g, hidden, hidden], activation)
        self.actor_head = _mlp([3 * hidden, hidden, outputs_per_user], activation)
        # outputs shared by all users (e.g. a verification deadline) from the pooled context
        self.global_head = (
            _mlp([2 * hidden + g, hidden, global_outputs], activation) if global_outputs else None
        )
        self.critic = _mlp([2 * hidden + g, hidden, hidden], activation)
        self.activation = activation()
        self.latent_dim_pi = max_users * outputs_per_user + global_outputs
        self.latent_dim_vf = hidden

    def _encode(self, obs: torch.Tensor):
        n, k, f = obs.shape[0], self.max_users, self.user_features
        users = obs[:, : k * f].reshape(n, k, f)
        glob = obs[:, k * f :]
        mask = (users[..., :1] > 0.5).float()  # active flag
        h = self.activation(self.encoder(torch.cat([users, glob[:, None, :].expand(n, k, -1)], -1)))
        count = mask.sum(1).clamp(min=1.0)
        mean = (h * mask).sum(1) / count
        maxed = (h * mask - 1e4 * (1 - mask)).max(1).values
        return h, mean, maxed, glob

    def forward_actor(self, obs: torch.Tensor) -> torch.Tensor:
        h, mean, maxed, _ = self._encode(obs)
        k = self.max_users
        context = torch.cat([mean, maxed], -1)[:, None, :].expand(-1, k, -1)
        out = self.actor_head(torch.cat([h, context], -1))  # (n, K, outputs_per_user)
        # lay out as the codec expects: all users' first output, then all users' second...
        flat = (
            out.transpose(1, 2).reshape(obs.shape[0], -1)
            if self.block_major
            else out.reshape(obs.shape[0], -1)
        )
        if self.global_head is None:
            return flat
        glob = obs[:, k * self.user_features :]
        return torch.cat([flat, self.global_head(torch.cat([mean, maxed, glob], -1))], -1)

    def forward_critic(self, obs: torch.Tensor) -> torch.Tensor:
        _, mean, maxed, glob = self._encode(obs)
        return self.activation(self.critic(torch.cat([mean, maxed, glob], -1)))

    def forward(self, obs: torch.Tensor):
        return self.forward_actor(obs), self.forward_critic(obs)


class PerUserActorCriticPolicy(ActorCriticPolicy):
    """SB3 ``ActorCriticPolicy`` whose actor is per-user weight-shared (see module docstring).

    Extra policy_kwargs: ``hidden`` (width of every per-user layer, default 64) and
    ``action_bias`` (initial mean of Box actions; e.g. -0.6 starts ``lengths`` near L = 5 of
    25 instead of the middle bin, which saves the first updates from very long rounds),
    ``lever_log_std`` (with an explicit layout: the initial log std of every action entry after
    the first per-user block, i.e. the protocol levers of ``residual``/``lengths`` actions) and
    ``zero_init`` (the last actor layer starts at zero, so the mean action is exactly 0: with
    ``residual`` actions the untrained policy *is* the base heuristic).
    """

    def __init__(
        self,
        observation_space,
        action_space,
        lr_schedule,
        hidden: int = 64,
        action_bias: float = 0.0,
        zero_init: bool = False,
        layout: tuple | None = None,
        lever_log_std: float | None = None,
        **kwargs,
    ) -> None:
        self._lever_log_std = lever_log_std
        self._hidden = hidden
        self._action_bias = action_bias
        self._zero_init = zero_init
        self._layout = (
            tuple(layout) if layout is not None else infer_layout(observation_space, action_space)
        )
        kwargs.pop("net_arch", None)
        super().__init__(observation_space, action_space, lr_schedule, net_arch=[], **kwargs)

    def _build_mlp_extractor(self) -> None:
        max_users, user_features, outputs, *extended = self._layout
        if extended:  # (global features, global outputs): an explicit layout (env_layout)
            self.mlp_extractor = PerUserNetwork(
                max_users, user_features, outputs, hidden=self._hidden,
                global_features=extended[0], global_outputs=extended[1], block_major=True,
            )  # fmt: skip
        else:
            self.mlp_extractor = PerUserNetwork(
                max_users, user_features, outputs, hidden=self._hidden
            )

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        # the per-user head already emits the action parameters: no mixing layer across users
        self.action_net = nn.Identity()
        heads = [self.mlp_extractor.actor_head[-1]]
        if self.mlp_extractor.global_head is not None:
            heads.append(self.mlp_extractor.global_head[-1])
        for last in heads:
            if self._zero_init:  # mean action exactly 0: residual actions start at the base
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
            else:
                nn.init.orthogonal_(last.weight, gain=0.01)
                bias = self._action_bias if isinstance(self.action_space, spaces.Box) else 0.0
                nn.init.constant_(last.bias, bias)
                if len(self._layout) > 3:  # explicit layout: the bias shifts lengths only,
                    with torch.no_grad():  # not the protocol levers (thresholds, groups, deadline)
                        if last is heads[0]:
                            last.bias[1:] = 0.0
                        else:
                            last.bias.zero_()
        if self._lever_log_std is not None and len(self._layout) > 3:
            # explore the protocol levers (all outputs after each user's length) more widely
            # than the lengths: a residual group move needs an action above 0.5
            with torch.no_grad():
                self.log_std[self._layout[0] :] = self._lever_log_std
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )


def env_layout(episodes) -> tuple[int, int, int, int, int]:
    """The explicit layout of a :class:`~multispin_env.episodes.BatchedEpisodes`: (user
    slots, features per user, outputs per user, global features, global outputs). Needed
    for the extended protocols' actions and observations, which :func:`infer_layout` cannot
    tell apart from the shapes alone."""
    per_user, global_outputs = episodes.codec.layout()
    if per_user == 0:
        raise ValueError("the per-user policy needs per-user actions (not 'homogeneous')")
    spec = episodes.spec
    return (
        spec.max_users,
        len(spec.user_features),
        per_user,
        len(spec.global_features),
        global_outputs,
    )


def infer_layout(observation_space, action_space) -> tuple[int, int, int]:
    """(user slots, features per user, actor outputs per user) from the two spaces."""
    g = len(GLOBAL_FEATURES)
    obs_dim = observation_space.shape[0]
    # +1: observe_true_alpha; +2: a base heuristic's allocation (residual actions)
    feature_counts = tuple(len(USER_FEATURES) + extra for extra in (0, 1, 2, 3))
    if isinstance(action_space, spaces.MultiDiscrete):
        candidates = [(len(action_space.nvec), int(action_space.nvec[0]))]
    elif isinstance(action_space, spaces.Box) and action_space.shape[0] > 1:
        dim = action_space.shape[0]
        candidates = [(dim, 1)] + ([(dim // 2, 2)] if dim % 2 == 0 else [])
    else:
        candidates = []
    for users, outputs in candidates:
        if (obs_dim - g) % users == 0 and (obs_dim - g) // users in feature_counts:
            return users, (obs_dim - g) // users, outputs
    raise ValueError(
        "PerUserActorCriticPolicy needs a multispin observation and a per-user action space "
        f"(action_mode lengths, full or lengths_discrete); got {observation_space} and "
        f"{action_space}"
    )


def permute_users(obs: np.ndarray, perm: np.ndarray, user_features: int) -> np.ndarray:
    """Observation with user slots reordered (for equivariance tests)."""
    k = len(perm)
    users = obs[..., : k * user_features].reshape(*obs.shape[:-1], k, user_features)
    rest = obs[..., k * user_features :]
    return np.concatenate([users[..., perm, :].reshape(*obs.shape[:-1], -1), rest], -1)
