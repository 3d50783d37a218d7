"""Model architectures, registry and weights handling."""
