"""Speed-ups applied to a model from outside, and the plan that picks them for this machine."""
