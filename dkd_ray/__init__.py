"""dkd-ray: Diverse Knowledge Distillation for end-to-end person search, trained on Ray."""

__version__ = "0.1.0"
