"""RL core: advantages, losses, rewards, the update step."""
