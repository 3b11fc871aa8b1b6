"""Per-worker training loops, checkpoint state, Ray Train wiring."""
