"""Show-o backbone: Phi body, tokenizer and prompts, concept tokens, MAGVIT-v2, MaskGIT sampling.

Knows nothing about Ray or rewards.
"""
