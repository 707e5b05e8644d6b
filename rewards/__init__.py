"""Reward experts (TIER, BER, DER, FER, CLIP, UniPercept) and the ensemble. Plain classes, no Ray inside."""
