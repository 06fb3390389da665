"""Measure a device and a model the way the planner needs them."""
