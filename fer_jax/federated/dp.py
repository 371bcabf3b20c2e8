"""Client-level differential privacy for the FedAvg family: DP-FedAvg and its accountant.

The mechanism (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018, Alg. 1 with the fixed-denominator estimator), inside the engine's round:
  1. every client's delta (its FEDERATED leaves after local training minus the server's) is
     clipped to L2 norm C over all federated leaves together: delta * min(1, C / ||delta||);
  2. the server sums the clipped deltas, each with weight 1 (weighting='uniform'), adds
     N(0, (z_delta C)^2 I) once, from a key derived from the round key (so the noise does not
     depend on the number of devices), and divides by the fixed denominator m = the number of
     clients sampled this round (public; clients that fail or hold no data still count);
  3. adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
     Clipping", NeurIPS 2021, Alg. 1), optional: C follows the target quantile gamma of the
     update norms, C <- C exp(-eta (b - gamma)), b = (#{||delta|| <= C} + N(0, sigma_b^2)) / m.
The server optimizer then runs on -(that mean), as for plain FedAvg.

What is guaranteed: the sampler draws m distinct clients uniformly without replacement out of
the population's N every round (`CohortSampler` mode 'round'; N and m are public). Neighbouring
datasets differ in one client's data replaced by anything (the "replace one" relation): the
clipped sum then moves by at most 2C in L2 and the count by at most 1, so a round is the
sampled-without-replacement Gaussian mechanism with noise multiplier (std / sensitivity)
  z / 2,   where  (z / 2)^-2 = (z_delta / 2)^-2 + sigma_b^-2
(the vector (sum / (z_delta C), count / sigma_b) has sensitivity 2 / z_delta and 1 / sigma_b; with
fixed clipping sigma_b = inf and z_delta = z). `noise_multiplier` z is thus the one for fixed
clipping with the same privacy; adaptive clipping spends part of it on the count. The RDP
accountant of dp-accounting (Wang, Balle and Kasiviswanathan, AISTATS 2019, Thm. 27: its only
bound for fixed-size sampling, for "replace one") composes the rounds; epsilon is reported at
`delta`. Poisson sampling (and the PLD accountant, which needs it) is not implemented.
Outside the guarantee: the per-client training metrics the engine reports and the exact
clipped fraction (diagnostics for the operator, like the loss; do not publish them).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Largest noise multiplier `calibrate` considers: a target needing more is "unreachable".
MAX_NOISE_MULTIPLIER = 1e3
# fold_in(round key, NOISE_STREAM): the server noise's key (clients fold in their ids, which
# are far below it).
NOISE_STREAM = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Client-level DP-FedAvg knobs (the engine's `dp` argument; `fed.dp` in configs).

    clip_norm: C, the L2 bound of each client's federated delta (the initial C with adaptive
      clipping); inf = no clipping (then nothing is private: for tests).
    noise_multiplier: z, the server noise std on the sum is z * C; None: calibrated from
      `target_epsilon` for `rounds` rounds at the first plan() (when N and m are known).
    target_epsilon: the epsilon after `rounds` rounds that `noise_multiplier` is chosen for.
    delta: the delta of the reported epsilon; None = 1 / N^1.1 (N = population size).
    rounds: the planned rounds (for target_epsilon).
    target_quantile: adaptive clipping's gamma in (0, 1); None = fixed clip norm.
    clip_learning_rate: eta of the geometric clip update (Andrew et al. use 0.2).
    clip_count_stddev: sigma_b, the noise on the count of unclipped clients; None = m / 20
      (Andrew et al.'s choice). Must exceed z / 2 (the count cannot take all the budget).
    """

    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    rounds: int = 0
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    clip_count_stddev: float | None = None

    def __post_init__(self):
        if not self.clip_norm > 0:
            raise ValueError(f"DPConfig.clip_norm={self.clip_norm}: expected > 0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DPConfig: give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"DPConfig.noise_multiplier={self.noise_multiplier}: expected >= 0")
        if self.target_epsilon is not None:
            if not self.target_epsilon > 0:
                raise ValueError(f"DPConfig.target_epsilon={self.target_epsilon}: expected > 0")
            if self.rounds < 1:
                raise ValueError(f"DPConfig.rounds={self.rounds}: expected >= 1 with "
                                 "target_epsilon (the rounds the budget is planned for)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"DPConfig.delta={self.delta}: expected in (0, 1)")
        if self.target_quantile is not None and not 0 < self.target_quantile < 1:
            raise ValueError(f"DPConfig.target_quantile={self.target_quantile}: expected in "
                             "(0, 1)")
        if not self.clip_learning_rate > 0:
            raise ValueError(f"DPConfig.clip_learning_rate={self.clip_learning_rate}: "
                             "expected > 0")
        if self.clip_count_stddev is not None and not self.clip_count_stddev > 0:
            raise ValueError(f"DPConfig.clip_count_stddev={self.clip_count_stddev}: "
                             "expected > 0")

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """The resolved mechanism: what server_update needs, static (hashable) for jit.

    noise_multiplier: z (privacy of the round as fixed clipping with z); delta_noise: z_delta,
    the multiplier of the noise on the delta sum; count_stddev: sigma_b (inf: fixed clipping).
    """

    noise_multiplier: float
    delta_noise: float
    count_stddev: float
    target_quantile: float | None
    clip_learning_rate: float

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None


def default_delta(population_size: int) -> float:
    """1 / N^1.1: below 1/N, so that no mechanism may release a whole client's data."""
    return 1.0 / population_size ** 1.1


def round_event(population_size: int, cohort_size: int, noise_multiplier: float):
    """One round as a dp_accounting event: m of N sampled without replacement, Gaussian with
    noise multiplier z / 2 (the replace-one sensitivity of the clipped sum is 2C)."""
    import dp_accounting

    return dp_accounting.SampledWithoutReplacementDpEvent(
        population_size, cohort_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2))


def _accountant():
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def epsilon(population_size: int, cohort_size: int, noise_multiplier: float, rounds: int,
            delta: float) -> float:
    """epsilon at `delta` after `rounds` identical rounds (dp_accounting's RDP accountant)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        round_event(population_size, cohort_size, noise_multiplier), rounds)
    return float(_accountant().compose(event).get_epsilon(delta))


def calibrate(population_size: int, cohort_size: int, rounds: int, target_epsilon: float,
              delta: float, *, field: str = "DPConfig.target_epsilon") -> float:
    """The smallest noise multiplier (to 1e-3) whose epsilon after `rounds` is <= the target.

    Raises ValueError naming `field` when even MAX_NOISE_MULTIPLIER misses the target (the RDP
    bound's floor: about log(1 / delta) / (largest order - 1)).
    """
    import dp_accounting

    def eps(z):
        return epsilon(population_size, cohort_size, z, rounds, delta)

    floor = eps(MAX_NOISE_MULTIPLIER)
    if floor > target_epsilon:
        raise ValueError(
            f"{field}={target_epsilon}: cannot be reached in {rounds} rounds of {cohort_size} of "
            f"{population_size} clients at delta={delta:.3g}: even noise_multiplier="
            f"{MAX_NOISE_MULTIPLIER:g} gives epsilon={floor:.4g}")
    tol = 1e-3
    z = dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda z: dp_accounting.SelfComposedDpEvent(
            round_event(population_size, cohort_size, z), rounds),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.1, 1.0), tol=tol)
    z = float(z) + tol  # Brent's root is within tol either side: step onto the private side.
    while eps(z) > target_epsilon:
        z *= 1.001
    return z


def resolve(config: DPConfig, population_size: int, cohort_size: int) -> tuple[Mechanism, float]:
    """(the mechanism, delta) for cohorts of m = `cohort_size` out of N = `population_size`."""
    delta = config.delta if config.delta is not None else default_delta(population_size)
    z = config.noise_multiplier
    if z is None:
        z = calibrate(population_size, cohort_size, config.rounds, config.target_epsilon, delta)
    count_stddev, delta_noise = math.inf, z
    if config.adaptive:
        count_stddev = (config.clip_count_stddev if config.clip_count_stddev is not None
                        else cohort_size / 20)
        if z > 0:
            if not count_stddev > z / 2:
                raise ValueError(
                    f"DPConfig.clip_count_stddev={count_stddev:g} must exceed noise_multiplier/2"
                    f" = {z / 2:g}: the clip count would take the whole privacy budget (raise "
                    "it, or the cohort size: its default is m / 20)")
            delta_noise = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
        else:
            count_stddev = 0.0
    return Mechanism(noise_multiplier=z, delta_noise=delta_noise, count_stddev=count_stddev,
                     target_quantile=config.target_quantile,
                     clip_learning_rate=config.clip_learning_rate), delta


class Ledger:
    """The rounds a run has released: (N, m) per round index, and epsilon over them.

    Rounds not recorded (a resumed run's earlier rounds) count as `default` (N, m), the event
    the mechanism was resolved for. Each distinct event's one-round RDP curve is computed once
    (dp_accounting's RdpAccountant, ~0.5 s); epsilon then costs a vector sum: composition is
    additive in RDP.
    """

    def __init__(self, noise_multiplier: float, delta: float, default: tuple[int, int]):
        self.noise_multiplier, self.delta, self.default = noise_multiplier, delta, default
        self.rounds: dict[int, tuple[int, int]] = {}
        self._curves: dict[tuple[int, int], np.ndarray] = {}
        self._orders = None

    def record(self, round_index: int, population_size: int, cohort_size: int) -> None:
        self.rounds[round_index] = (int(population_size), int(cohort_size))

    def epsilon(self, rounds: int) -> float:
        """epsilon at `delta` after rounds 0..rounds-1."""
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from dp_accounting.rdp import rdp_privacy_accountant

        counts = collections.Counter(self.rounds.get(r, self.default) for r in range(rounds))
        total = sum(n * self._curve(*event) for event, n in counts.items())
        return float(rdp_privacy_accountant.compute_epsilon(self._orders, total, self.delta)[0])

    def _curve(self, population_size, cohort_size) -> np.ndarray:
        key = (population_size, cohort_size)
        if key not in self._curves:
            acc = _accountant().compose(round_event(population_size, cohort_size,
                                                    self.noise_multiplier))
            self._curves[key], self._orders = acc.rdp, acc.orders
        return self._curves[key]


# ----------------------------------------------------------------------------- on device


def clip_rows(stacked, clip_norm):
    """Each row (leading axis) of a pytree of [n, ...] leaves scaled to L2 norm <= clip_norm,
    the norm taken over all leaves together. Returns (clipped tree, norms [n] float32).

    The scale min(1, C / norm) is exactly 1 for rows within the bound (and for C = inf), so
    unclipped rows are bit-identical; a non-finite row stays non-finite (the round drops it).
    """
    leaves = jax.tree.leaves(stacked)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in leaves)
    norms = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, clip_norm / norms)

    def apply(x):
        s = scale.reshape((-1,) + (1,) * (x.ndim - 1))
        return (x.astype(jnp.float32) * s).astype(x.dtype)

    return jax.tree.map(apply, stacked), norms


def noise_key(round_key):
    """The key of a round's server noise: one per round, the same on every device and host."""
    return jax.random.fold_in(round_key, NOISE_STREAM)


def private_mean(mech: Mechanism, delta_sum, contributed, clipped, clip_norm, key, cohort_size):
    """(sum + N(0, (z_delta C)^2 I)) / m and the next clip norm.

    delta_sum: the sum of the clipped deltas (float32 leaves); contributed: the number of
    clients in it; clipped: how many of them were scaled down; clip_norm: C of this round;
    cohort_size: m, the fixed denominator. Returns (mean tree, next C, noised unclipped fraction
    (adaptive; NaN otherwise)).
    """
    k_delta, k_count = jax.random.split(key)
    denom = jnp.asarray(cohort_size, jnp.float32)
    if mech.delta_noise > 0:  # static: z = 0 adds nothing at all (no 0 * inf either)
        leaves, treedef = jax.tree.flatten(delta_sum)
        keys = jax.random.split(k_delta, len(leaves))
        std = mech.delta_noise * clip_norm
        leaves = [x + std * jax.random.normal(k, x.shape, jnp.float32)
                  for x, k in zip(leaves, keys, strict=True)]
        delta_sum = jax.tree.unflatten(treedef, leaves)
    mean = jax.tree.map(lambda s: s / denom, delta_sum)
    below = jnp.full((), jnp.nan, jnp.float32)
    if mech.adaptive:
        count = contributed - clipped
        if mech.count_stddev > 0:
            count = count + mech.count_stddev * jax.random.normal(k_count, (), jnp.float32)
        below = count / denom
        clip_norm = clip_norm * jnp.exp(-mech.clip_learning_rate
                                        * (below - mech.target_quantile))
    return mean, clip_norm, below
