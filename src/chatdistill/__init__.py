"""chatdistill: distil a large chat model into a small, fast one; evaluate, serve, ship it."""

__version__ = "0.1.0"
