"""lightning_lth."""
