"""Eager CUDA work off a graph capture's stream: what the training step's CUDA graph
(``training/cuda_graphs.py``) and the matching statistics' graph (``symmetry/matching.py``)
both need before they capture, so it sits below both."""

from __future__ import annotations

import torch

WARMUP = 3  # eager steps before the capture


def on_side_stream(device: torch.device, fn, *args):
    """``fn(*args)`` on a fresh CUDA stream, ordered after the current stream's work and before
    its next: the eager runs before a capture go off the capture's stream."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    return out
