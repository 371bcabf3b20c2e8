"""fer_jax: large-scale simulated federated learning for facial expression recognition in JAX.

Layers (an arrow = may import), see WORKSPACE.md#layout:
  main -> experiments -> {federated, steps} -> models -> losses
  experiments -> {data, evaluation, io}
`fer_jax.losses` depends on jax.numpy only and can be imported on its own.
"""

__version__ = "0.1.0"
