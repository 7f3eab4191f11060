"""Ray runtime, the shared power-flow actor and Tune sweeps."""
