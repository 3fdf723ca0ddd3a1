"""MicroLM."""
