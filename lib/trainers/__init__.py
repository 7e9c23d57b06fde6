"""Training: the torch.distributed engine (no MONAI Label imports) and its MONAI Label adapter."""
