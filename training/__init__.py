"""Training program of the built-in demo model (a tiny Stable Cascade trained on synthetic shapes)."""
