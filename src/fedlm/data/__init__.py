"""Offline datasets and their row formats."""
