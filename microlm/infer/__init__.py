"""Stage A8: generation, chat and (with ``microlm.model.hf_export``) the Hugging Face export."""

from microlm.infer.generate import Generation, GenerationConfig, generate_ids, generate_text, stream_text

__all__ = ["Generation", "GenerationConfig", "generate_ids", "generate_text", "stream_text"]
