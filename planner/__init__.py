"""Halda: choose each device's layer window from measured profiles (PuLP)."""
