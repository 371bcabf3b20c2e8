"""Client-level DP-FedAvg (issue 22): clipping, server noise, accounting, configs, devices.

The engine's DP round is checked against independent NumPy computations on the tiny MLP of
test_federated_round: the non-private round when nothing is clipped or noised, each client's
clipped delta, the noise's standard deviation, and dp_accounting's epsilon.
"""

import math

import dp_accounting
import jax
import ml_collections
import numpy as np
import pytest
from dp_accounting import rdp
from test_federated_round import SIZES, build_engine, make_population, np_round, to_np

from fer_jax import federated as fl
from fer_jax.federated import config as fed_config
from fer_jax.federated import dp as dp_lib
from fer_jax.train import checks

COHORTS = ([0, 2, 3, 4], [6, 3, 5])  # no empty client: the fixed denominator = clients trained
# Rolled local-step loops: the tiny MLP compiles ~3x faster than unrolled (same results).
ROLLED = fl.RoundBackend(step_unroll=1, group_unroll=1)


def dp_engine(clip_norm, noise_multiplier, **dp):
    return build_engine(weighting="uniform", backend=ROLLED, dp=dp_lib.DPConfig(
        clip_norm=clip_norm, noise_multiplier=noise_multiplier, **dp))


def run(engine, variables, population, cohorts, key=1):
    state = engine.init(variables)
    results = []
    for cohort in cohorts:
        state, res = engine.run_round(state, population, engine.plan(population, cohort),
                                      jax.random.PRNGKey(key))
        results.append(res)
    return state, results


def test_no_noise_and_no_clipping_equals_the_plain_round_exactly():
    _, population = make_population()
    plain, variables = build_engine(weighting="uniform", backend=ROLLED)
    private, _ = dp_engine(math.inf, 0.0)
    s0, _ = run(plain, variables, population, COHORTS)
    s1, results = run(private, variables, population, COHORTS)
    for k, v in to_np(s0.variables).items():
        np.testing.assert_array_equal(to_np(s1.variables)[k], v, err_msg=k)
    assert results[-1].dp["noise_std"] == 0.0 and results[-1].dp["epsilon"] == math.inf


def np_clipped_mean(server, clients, ids, clip):
    """Each client's NumPy delta (test_federated_round's sequential SGD) clipped to `clip`
    over all leaves, summed, over len(ids). Returns (mean, per-client clipped norms)."""
    deltas = [np_round(server, clients, [c], weighting="uniform") for c in ids]
    norms = [math.sqrt(sum(float((d[k] ** 2).sum()) for k in d)) for d in deltas]
    clipped = [{k: d[k] * min(1.0, clip / n) for k in d} for d, n in zip(deltas, norms,
                                                                          strict=True)]
    after = [math.sqrt(sum(float((d[k] ** 2).sum()) for k in d)) for d in clipped]
    return {k: sum(d[k] for d in clipped) / len(ids) for k in server}, norms, after


def test_every_clients_delta_is_clipped_to_the_norm():
    clients, population = make_population()
    ids = [0, 2, 3, 4, 5]
    server = to_np(build_engine()[1])
    _, norms, _ = np_clipped_mean(server, clients, ids, math.inf)
    clip = float(np.mean(np.sort(norms)[2:4]))  # between norms: the 2 largest are clipped
    mean, _, after = np_clipped_mean(server, clients, ids, clip)
    assert max(after) <= clip * (1 + 1e-9) and sum(n > clip for n in norms) >= 2
    engine, variables = dp_engine(clip, 0.0)
    state, (res,) = run(engine, variables, population, [ids])
    got = to_np(state.variables)
    for k in server:  # FedAvg server SGD, lr 1: new = server + clipped mean
        np.testing.assert_allclose(got[k] - server[k], mean[k], atol=1e-6, err_msg=k)
    assert res.dp["clipped_fraction"] == pytest.approx(np.mean(np.asarray(norms) > clip))
    # The device's clip of a stacked tree: every row within the bound, small rows untouched.
    rows = {"a": np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], np.float32),
            "b": np.array([[12.0], [0.0], [0.0]], np.float32)}
    clipped, n = dp_lib.clip_rows(rows, 1.0)
    np.testing.assert_allclose(n, [13.0, 0.5, 0.0])
    np.testing.assert_allclose(clipped["a"], [[3 / 13, 4 / 13], [0.3, 0.4], [0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(clipped["a"][1], rows["a"][1])


def test_server_noise_has_the_configured_std():
    """The round's update minus the NumPy clipped mean is the noise / m: over the 57 parameters
    and 30 keys (1710 draws, std's standard error 1.7%) its std is z C within 5%; a std of
    1.1 z C is 10% off and fails."""
    clients, population = make_population()
    ids, clip, z = [0, 2, 3], 0.05, 2.0
    server = to_np(build_engine()[1])
    mean, _, _ = np_clipped_mean(server, clients, ids, clip)
    engine, variables = dp_engine(clip, z)
    samples = []
    for key in range(30):
        state, (res,) = run(engine, variables, population, [ids], key=key)
        got = to_np(state.variables)
        samples += [(got[k] - server[k] - mean[k]).ravel() * len(ids) for k in server]
    noise = np.concatenate(samples)
    assert res.dp["noise_std"] == pytest.approx(z * clip)
    assert abs(noise.mean()) < 0.1 * z * clip
    assert abs(noise.std() / (z * clip) - 1) < 0.05
    assert abs(noise.std() / (1.1 * z * clip) - 1) > 0.05  # the test tells a 10% error apart


def reference_epsilon(n, m, z, rounds, delta):
    """dp_accounting, written out: RDP, replace-one, m of n without replacement, sensitivity
    2C of the clipped sum (so the Gaussian's multiplier is z / 2), composed `rounds` times."""
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        n, m, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return accountant.compose(event).get_epsilon(delta)


def test_logged_epsilon_is_dp_accountings():
    _, population = make_population()
    z, delta = 1.3, 1e-3
    engine, variables = dp_engine(1.0, z, delta=delta)
    _, results = run(engine, variables, population, [[0, 2, 3], [4, 5, 6], [3, 2, 0]])
    n = population.num_clients
    for r, res in enumerate(results):
        assert res.dp["epsilon"] == pytest.approx(reference_epsilon(n, 3, z, r + 1, delta),
                                                  rel=1e-12)
        assert res.dp["delta"] == delta
    report = engine.privacy_report()
    assert report["rounds"] == 3 and report["epsilon"] == results[-1].dp["epsilon"]
    # The default delta is 1 / N^1.1.
    assert dp_lib.resolve(dp_lib.DPConfig(noise_multiplier=1.0), 1000, 10)[1] == \
        pytest.approx(1000 ** -1.1)


@pytest.mark.slow
def test_target_epsilon_calibrates_the_noise():
    n, m, rounds, target, delta = 1000, 50, 100, 4.0, 1e-4
    z = dp_lib.calibrate(n, m, rounds, target, delta)
    assert reference_epsilon(n, m, z, rounds, delta) <= target
    assert reference_epsilon(n, m, z * 0.99, rounds, delta) > target


def test_sampler_matches_the_accountant():
    """The accountant assumes m distinct clients drawn uniformly out of N each round: the
    sampler's 'round' mode does exactly that (distinct, m, each client with frequency m / N)."""
    sampler = fl.CohortSampler(40, 8)
    draws = np.stack([sampler.sample(3, r) for r in range(2000)])
    assert all(len(set(d)) == 8 for d in draws)
    freq = np.bincount(draws.ravel(), minlength=40) / len(draws)
    np.testing.assert_allclose(freq, 8 / 40, atol=0.03)
    engine, _ = dp_engine(1.0, 1.0)
    _, population = make_population()
    with pytest.raises(ValueError, match="distinct"):
        engine.plan(population, [0, 2, 2])


def test_adaptive_clipping_tracks_the_quantile():
    """Noise-free adaptive clipping: C moves by exp(-eta (b - gamma)) with b the fraction of
    clients within C; the split noise keeps the round's privacy that of z."""
    _, population = make_population()
    engine, variables = dp_engine(1e-4, 0.0, target_quantile=0.5, clip_learning_rate=0.5)
    state, results = run(engine, variables, population, [[0, 2, 3, 4]] * 3)
    for before, after in zip(results, results[1:], strict=False):
        b = before.dp["unclipped_fraction"]
        assert b == 0.0  # 1e-4 clips everyone
        assert after.dp["clip_norm"] == pytest.approx(before.dp["clip_norm"] * math.exp(0.25),
                                                      rel=1e-5)
    mech, _ = dp_lib.resolve(dp_lib.DPConfig(noise_multiplier=1.0, target_quantile=0.5), 100, 40)
    assert mech.count_stddev == 2.0
    assert ((mech.delta_noise / 2) ** -2 + mech.count_stddev ** -2) ** -0.5 == \
        pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        dp_lib.resolve(dp_lib.DPConfig(noise_multiplier=1.0, target_quantile=0.5), 100, 10)


def config_with(**dp):
    fed = fed_config.fed_defaults()
    fed.update(partition="dirichlet", num_clients=1000, cohort_size=50, rounds=100,
               weighting="uniform")
    fed["dp"] = {**fed_config.dp_defaults(), "enabled": True, "noise_multiplier": 1.0, **dp}
    return ml_collections.ConfigDict({"fed": fed, "data": {"name": "fer2013"}})


@pytest.mark.parametrize("field,value,match", [
    ("clip_norm", 0.0, r"config\.fed\.dp\.clip_norm=0\.0: expected > 0"),
    ("clip_norm", -1.0, r"config\.fed\.dp\.clip_norm=-1\.0"),
    ("delta", 1.0, r"config\.fed\.dp\.delta=1\.0: expected in \(0, 1\)"),
    ("delta", 0.0, r"config\.fed\.dp\.delta=0\.0"),
    ("noise_multiplier", -0.5, r"config\.fed\.dp\.noise_multiplier=-0\.5"),
    ("target_quantile", 1.5, r"config\.fed\.dp\.target_quantile=1\.5"),
])
def test_bad_dp_fields_raise_naming_the_field(field, value, match):
    config = config_with(**{field: value})
    with pytest.raises(ValueError, match=match):
        fed_config.validate(config, checks.checker(config))


def test_unreachable_target_and_bad_combinations_raise_before_any_work():
    config = config_with(noise_multiplier=None, target_epsilon=0.001)
    with pytest.raises(ValueError, match=r"config\.fed\.dp\.target_epsilon=0\.001: expected "
                                         r"reachable in fed\.rounds=100 rounds of 50 of 1000"):
        fed_config.validate(config, checks.checker(config))
    config = config_with(target_epsilon=4.0)
    with pytest.raises(ValueError, match="exactly one of fed.dp.noise_multiplier"):
        fed_config.validate(config, checks.checker(config))
    config = config_with()
    config.fed.weighting = "num_examples"
    with pytest.raises(ValueError, match=r"config\.fed\.weighting='num_examples': expected "
                                         "'uniform' with fed.dp.enabled"):
        fed_config.validate(config, checks.checker(config))
    with pytest.raises(ValueError, match="weighting='uniform'"):
        build_engine(dp=dp_lib.DPConfig(noise_multiplier=1.0))
    # A population known only from the data (subject partitions): the engine's setup fails.
    engine, _ = dp_engine(1.0, None, target_epsilon=0.001, rounds=100)
    with pytest.raises(ValueError, match="target_epsilon=0.001: cannot be reached in 100 rounds"):
        engine.setup_privacy(1000, 50)
    for bad in (dict(clip_norm=0.0), dict(delta=1.0), dict(delta=0.0)):
        with pytest.raises(ValueError, match=f"DPConfig.{next(iter(bad))}"):
            dp_lib.DPConfig(noise_multiplier=1.0, **bad)


def test_build_engine_wires_the_dp_block():
    config = config_with(clip_norm=0.5, noise_multiplier=None, target_epsilon=8.0,
                         delta=1e-4, target_quantile=0.5)
    method = build_engine()[0].spec.method
    engine = fed_config.build_engine(config.fed, method, max_client_size=max(SIZES),
                                     mesh=fl.clients_mesh(jax.devices()[:1]))
    assert engine.weighting == "uniform" and engine.spec.clip
    assert engine.dp == dp_lib.DPConfig(clip_norm=0.5, target_epsilon=8.0, delta=1e-4,
                                        rounds=100, target_quantile=0.5)
    assert fed_config.build_engine(config_with(enabled=False).fed, method,
                                   max_client_size=max(SIZES)).dp is None


def test_dp_on_eight_devices_equals_one_device():
    """The noise key comes from the round key, not the device: 8 devices == 1 device."""
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    _, population = make_population()
    cohorts = [[0, 2, 3, 4, 5, 6], [6, 3, 5, 0]]
    dp = dp_lib.DPConfig(clip_norm=0.05, noise_multiplier=1.5, target_quantile=0.5,
                         clip_count_stddev=1.0)
    one, variables = build_engine(weighting="uniform", clients_per_call=8, dp=dp,
                                  backend=ROLLED)
    eight, _ = build_engine(weighting="uniform", clients_per_call=8, dp=dp, backend=ROLLED,
                            mesh=fl.clients_mesh())
    s1, r1 = run(one, variables, population, cohorts)
    s8, r8 = run(eight, variables, population, cohorts)
    assert s8.variables["params"]["head"]["kernel"].sharding.mesh.size == 8
    for k, v in to_np(s1.variables).items():
        np.testing.assert_allclose(to_np(s8.variables)[k], v, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(s8.dp["clip_norm"]), float(s1.dp["clip_norm"]), rtol=1e-6)
    assert r1[-1].dp["epsilon"] == r8[-1].dp["epsilon"]


def test_partial_federation_clips_the_federated_leaves_only():
    """VFER-style head-only FedAvg: the clip norm bounds the federated head's delta; the frozen
    hidden layer never moves."""
    clients, population = make_population()
    ids, clip = [0, 2, 3], 1e-3
    engine, variables = build_engine(
        weighting="uniform", dp=dp_lib.DPConfig(clip_norm=clip, noise_multiplier=0.0),
        backend=ROLLED,
        param_filter=fl.regex_filter([("params/head/.*", fl.FEDERATED)], fl.FROZEN))
    state, _ = run(engine, variables, population, [ids])
    before, after = to_np(variables), to_np(state.variables)
    np.testing.assert_array_equal(after["w1"], before["w1"])
    moved = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in ("w2", "b2")))
    assert 0 < moved <= clip * (1 + 1e-5)  # the mean of clipped deltas
