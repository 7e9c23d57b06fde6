"""MONAI Label infer tasks: thin adapters from MONAI Label requests to lib.inference and lib.activelearning."""
