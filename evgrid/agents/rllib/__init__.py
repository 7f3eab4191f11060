"""RLlib adapter, RLModules and policy mapping: the one place RLlib is imported."""
