"""Training: the LightningModule (``module.py``), fused arms (``fused.py``), the CUDA-graph
step (``cuda_graphs.py``), the epoch's loss/accuracy sums (``epoch_sums.py``), the callbacks
(``callbacks.py``), Lightning's per-hook bookkeeping made cheap (``lean.py``) and the resume
tests' fault injection (``failpoints.py``)."""
