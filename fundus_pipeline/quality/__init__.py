"""The quality set and its label (``fundus build quality-set``), which ``fundus score`` learns from."""
