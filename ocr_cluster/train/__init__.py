"""Training: per-worker loop, losses, LR schedule, evaluation, checkpoints, TorchTrainer driver."""
