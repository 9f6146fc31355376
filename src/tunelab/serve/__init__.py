"""Serving: an OpenAI-compatible HTTP API over one or more runs."""
