"""Data from a teacher model behind an OpenAI-compatible endpoint: label, synthesise."""
