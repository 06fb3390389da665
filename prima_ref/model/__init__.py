"""Transformer forward for llama, qwen2 and gemma3, expressed per layer range."""
