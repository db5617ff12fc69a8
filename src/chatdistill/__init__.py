"""chatdistill: distil a large chat model into a small, fast one, then evaluate, serve and ship it."""

__version__ = "0.1.0"
