"""The training step as one CUDA graph (``model.cuda_graphs``).

On a fast GPU a small net's step is bound by the CPU launching its kernels one by one. Here
the whole step -- forward, loss, backward with the mask's gradient hooks, the SGD step with
its re-mask hook, and the epoch's running loss/accuracy sums (``EpochSums`` for one net, the
per-member sums of a fused group) -- is captured once and then replayed with one launch per
batch; per step the CPU only copies the batch into the graph's input buffers. The same class
steps one net (``LTHModule``) and a fused group of nets (``FusedArms``): each gives its own
forward-and-loss function.

What the graph needs, and how it gets it:
- The learning rate is a device tensor that the schedule fills in place (a float would be
  baked into the graph); the SGD step is torch's fused kernel, which reads it there.
- The momentum buffers, cuDNN's algorithm choice and the allocator settle in ``WARMUP``
  eager steps on a side stream before the capture (those are real training steps).
- A batch of another shape (an epoch's last, smaller batch) runs the same step eagerly.
- Autocast (bf16-mixed) is entered with its weight-cast cache off, as capture requires.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_lth.cuda_streams import WARMUP, on_side_stream


class GraphedStep:
    """One training step with ``optimizer`` (fused SGD, tensor learning rate): eager for the
    first ``WARMUP`` steps and for odd-shaped batches, else a graph replay. ``loss_fn(images,
    labels)`` is the forward: it returns the loss to minimise and adds the batch to the
    epoch's running sums (device tensors updated in place, so a replay updates them too);
    ``replayed``, where given, is called after each replay (the Python bookkeeping of those
    sums that a replay skips).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, device: torch.device,
                 replayed: Callable[[], None] | None = None):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.loss_fn, self.optimizer, self.device = loss_fn, optimizer, device
        self.replayed = replayed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None
        self.eager_steps = 0

    def _autocast(self):
        kind = self.device.type
        return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                              enabled=torch.is_autocast_enabled(kind), cache_enabled=False)

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step's work, on whatever tensors it is given (captured or run eagerly)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(images, labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Train on one batch; the batch's mean loss (valid until the next call)."""
        if self.graph is None and self.eager_steps >= WARMUP:
            self._capture(images, labels)
        if self.graph is not None and images.shape == self.inputs[0].shape:
            self.inputs[0].copy_(images)
            self.inputs[1].copy_(labels)
            self.graph.replay()
            if self.replayed is not None:
                self.replayed()
            return self.loss
        self.eager_steps += 1
        return on_side_stream(self.device, self._step, images, labels)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = (images.clone(), labels.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self._step(*self.inputs)
        self.graph = graph  # capturing ran nothing: the caller replays it for this batch
