"""MicroLM, the course's code: a small Chinese language model built from scratch (pipeline A), and
relation extraction by a LoRA on a causal LM, evaluated, merged and served with vLLM (pipeline B)."""
