"""DeepSeek V4 Flash in MLX: config, weights, tokenizer, forward pass, decode state, generation.

Knows nothing about agents.
"""
