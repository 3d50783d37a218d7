"""Torch-free simulator of low-quality retinal fundus photographs (Cofe-Net degradation model and more)."""
