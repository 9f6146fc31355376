"""The report: one self-contained HTML page per run, and runs side by side."""
