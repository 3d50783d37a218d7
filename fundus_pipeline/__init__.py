"""fundus: an end-to-end command-line pipeline for retinal fundus photographs."""

__version__ = "0.1.0"
__all__ = ["__version__"]
