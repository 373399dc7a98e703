"""Operator side: the ServerApp, aggregation, run store, console and simulation."""
