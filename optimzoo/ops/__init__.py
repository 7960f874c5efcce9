"""Pure tensor kernels shared by the optimizers (no optimizer state)."""
