"""Distillation: box jitter (ISA/FSA), the three KD losses, the knowledge bank."""
