"""lightning_lth."""

__version__ = "0.2.0"  # 0.2.0: the key policy of docs/keys.md (every stored stage re-keyed once)
