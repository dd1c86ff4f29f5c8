"""Training: run config, DeepSpeed engine setup, the loop, checkpoints, metrics."""
