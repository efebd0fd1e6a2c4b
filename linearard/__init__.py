"""LinearARD: attention-relation distillation for RoPE-extended LLMs (no Ray imports in this package)."""
