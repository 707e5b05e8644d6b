"""Reward experts (TIER, BER, DER, FER, CLIP) and the ensemble. Plain classes, no Ray inside."""
