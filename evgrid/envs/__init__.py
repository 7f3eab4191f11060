"""Simulator core and the EVGrid PettingZoo environment (arrays, not per-EV objects)."""
