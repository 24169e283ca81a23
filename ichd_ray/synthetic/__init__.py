"""Synthetic head-CT studies with known bleeds and labels: the demo's data and the tests'."""
