"""Fixtures: luks."""
