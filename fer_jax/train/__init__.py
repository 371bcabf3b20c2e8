"""The driver library: what every experiment shares, so an experiment is method + data + evals.

  checks   config validation (one checker, the shared data/model/train/fed blocks, the mode)
  optim    optimizers and learning-rate schedules from a config's `train` block
  run      `Run`: a workdir's writer, checkpointer, lock-free resume, the end-of-run report
  loops    the one centralized loop and the one federated loop

Centralized training is the method's client (the `init / step / final` of fer_jax.federated)
run on the pooled training set: one client holding every example, its optimizer state kept
across steps. So a method defines its update once, and `mode=centralized` and a one-client
federated round start from the same state and take the same first step.
"""

from fer_jax.train import checks, loops, optim
from fer_jax.train.run import Run

__all__ = ["Run", "checks", "loops", "optim"]
