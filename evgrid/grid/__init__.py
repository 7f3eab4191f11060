"""Physics only: feeders, profiles, power flow, limits.  Never imports gymnasium, pettingzoo or ray."""
