"""Ray Tune sweeps over the distillation and augmentation settings."""
