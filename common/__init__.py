"""Shared by site and server: configuration, models, data, privacy maths, secure aggregation."""
