"""The federated engine: sampling, packing, the jitted round, aggregation, partial federation.

See round.py for the data's way through a round and RoundBackend for the CPU/accelerator knobs.
"""

from fer_jax.federated.aggregate import server_optimizer, weighted_mean, weighted_sum
from fer_jax.federated.client import (
    ClientMethod,
    SupervisedClient,
    SupervisedState,
    classifier_loss,
)
from fer_jax.federated.local_store import LocalStore
from fer_jax.federated.mesh import clients_mesh, initialize_distributed
from fer_jax.federated.packing import CohortPlan, PackingConfig, pack_cohort, plan_cohort
from fer_jax.federated.partial import FEDERATED, FROZEN, LOCAL, federate_all, regex_filter
from fer_jax.federated.population import ArrayPopulation, SyntheticPopulation
from fer_jax.federated.round import (
    FederatedEngine,
    NonFiniteClientError,
    RoundBackend,
    RoundResult,
    ServerState,
    client_begin,
    client_chunk,
    client_end,
    client_steps,
    server_update,
)
from fer_jax.federated.sampling import CohortSampler, SamplerState

__all__ = [
    "ArrayPopulation", "ClientMethod", "CohortPlan", "CohortSampler", "FEDERATED", "FROZEN",
    "FederatedEngine", "LOCAL", "LocalStore", "NonFiniteClientError", "PackingConfig",
    "RoundBackend", "RoundResult", "SamplerState", "ServerState", "SupervisedClient",
    "SupervisedState", "SyntheticPopulation", "classifier_loss", "client_begin",
    "client_chunk", "client_end", "client_steps", "clients_mesh", "federate_all",
    "initialize_distributed", "pack_cohort", "plan_cohort",
    "regex_filter", "server_optimizer", "server_update", "weighted_mean", "weighted_sum",
]
