"""Masks and iterative magnitude pruning."""
