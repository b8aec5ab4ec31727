"""Training: checkpoints, the optimizer and schedule, DDP/FSDP2 under torchrun, and the loop."""
