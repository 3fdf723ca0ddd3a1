"""Pipeline B: InstructIE-style relation extraction data (B1–B2), Qwen LoRA, evaluation, serving."""
