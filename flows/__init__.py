"""Prefect flows (`retrain` and the stage groups), their pydantic run form, the CLI, the UI."""
