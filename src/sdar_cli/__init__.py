"""sdar: train multi-turn LLM agents with GRPO + SDAR's gated self-distillation."""

__version__ = "0.1.0"
