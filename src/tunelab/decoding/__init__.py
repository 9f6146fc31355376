"""Decoding: the one generation loop of eval, generate, chat and serve, and its constraints."""
