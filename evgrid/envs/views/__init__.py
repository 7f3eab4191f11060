"""What each agent level sees, does and earns, over the simulator: observation features (declared once),
action decoding, rewards (pure functions of a StepRecord) and the grouped view's slots."""
