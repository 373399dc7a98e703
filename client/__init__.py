"""Site agent: the ClientApp, the DP-LoRA trainer, the privacy ledger and the egress audit log."""
