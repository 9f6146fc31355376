"""Training: tokenize and pack, the loss and the step, checkpoints, the loop."""
