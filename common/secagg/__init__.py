"""fedtune secure aggregation: keys, Shamir shares, masking and the protocol state machines."""
