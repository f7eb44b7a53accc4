"""Memorization measurements for Stable-Diffusion-style models (see README)."""
