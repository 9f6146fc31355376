"""Data: read and check training files, split them without leakage, find duplicates."""
