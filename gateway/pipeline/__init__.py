"""The ordered-checks pipeline: Check protocol, runner and registry."""
