"""Prefect flows: thin wiring of sluicegate's stage functions."""
