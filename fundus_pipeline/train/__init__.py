"""Training entry points (``fundus train ...``)."""
