"""Fixtures: tpm."""
