"""Training: trainable/frozen partition, optimizer, update step, checkpoints, metrics."""
