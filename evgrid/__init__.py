"""evgrid: multi-agent, distributed simulation of EV charging on power distribution networks."""

__version__ = "0.1.0"
