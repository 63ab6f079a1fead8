"""Fixtures: keyring."""
