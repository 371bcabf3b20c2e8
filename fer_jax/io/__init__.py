"""Host-side I/O: orbax checkpoints, metric writers, progress reporting."""
