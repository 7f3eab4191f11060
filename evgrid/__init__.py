"""evgrid: multi-agent, distributed simulation of EV charging on power distribution networks."""

from evgrid.envs.registry import make

__version__ = "0.1.0"
__all__ = ["make"]
