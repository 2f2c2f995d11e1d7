"""Prefect tasks: thin wrappers over the mergeflow library (retries on I/O only)."""
