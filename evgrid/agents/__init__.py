"""Rule baselines and the RLlib glue (evgrid.agents.rllib)."""
