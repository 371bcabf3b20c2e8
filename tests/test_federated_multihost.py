"""Two processes on localhost (CPU collectives, jax.distributed) give the one-process round."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

WORKER = r'''
import json, sys
import jax
from fer_jax import federated as fl
fl.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
from test_federated_round import build_engine, make_population, to_np
_, population = make_population()
engine, variables = build_engine(clients_per_call=2, mesh=fl.clients_mesh())
state = engine.init(variables)
for cohort in ([0, 1, 2, 3, 4], [6, 3, 5]):
    state, res = engine.run_round(state, population, engine.plan(population, cohort),
                                  jax.random.PRNGKey(1))
out = {k: v.tolist() for k, v in to_np(fl.mesh.to_host(state.variables)).items()}
print("RESULT" + json.dumps(out), flush=True)
'''


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from test_federated_round import build_engine, make_population, to_np

    _, population = make_population()
    engine, variables = build_engine(clients_per_call=2)
    state = engine.init(variables)
    for cohort in ([0, 1, 2, 3, 4], [6, 3, 5]):
        state, _ = engine.run_round(state, population, engine.plan(population, cohort),
                                    jax.random.PRNGKey(1))
    expected = to_np(state.variables)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    tests_dir = str(pathlib.Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, str(script), f"localhost:{port}", str(i),
                               tests_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        got = json.loads(out.split("RESULT")[-1])
        for k, v in expected.items():
            np.testing.assert_allclose(np.asarray(got[k]), v, atol=1e-6, rtol=1e-5)
