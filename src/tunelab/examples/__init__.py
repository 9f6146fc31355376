"""Bundled example datasets used by ``tunelab demo``."""
