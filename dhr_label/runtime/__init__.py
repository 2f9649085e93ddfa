"""Orchestration: worker processes and progress, kept out of the array code and the CLI."""
