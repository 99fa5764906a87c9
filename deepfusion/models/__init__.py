"""The networks, their ImageNet weights, the linear probe and self-contained checkpoints."""
