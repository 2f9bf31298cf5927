"""Training: data pipeline, distillation losses, Lagrangian sparsity control, checkpoints."""
