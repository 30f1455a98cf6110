"""Training runs: configuration, the loop, checkpoints, logs and plots (used by the CLI)."""
