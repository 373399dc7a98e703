"""fedtune: federated DP-LoRA fine-tuning with secure aggregation."""
