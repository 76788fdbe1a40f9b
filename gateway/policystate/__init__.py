"""Operator-managed policy state kept in the database (time-boxed limit overrides, ...)."""
