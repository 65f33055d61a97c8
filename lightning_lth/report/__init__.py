"""Turn the per-arm results (results.jsonl or a W&B project) into the paper's tables and figures.

Tables 3-5: test accuracy (%) as mean ± std over seeds, rows sparsity x method, columns rewind
epoch k.  Figs. 3/4: accuracy vs k per sparsity; Fig. 7: accuracy vs sparsity per k; plus the
matching-quality interpolation curves and loss/error barriers before/after matching. With the
store at hand, also each arm's accuracy over its epochs (its CSV log) and the study's cost
(events.log). Written as report.md, report.html (one self-contained page), report.csv and PNGs.

The modules, by concern:

- ``aggregate``: what tables and figures both compute from the records (the arms in order,
  mean ± std over seeds, the (sparsity, method, k) cells).
- ``plots``: every figure.
- ``load``: results.jsonl and W&B reading, record validation, the arms' CSV logs and the
  connectivity files from the store.
- ``tables``: the accuracy, barrier, matching and cost tables, the CSV rows, markdown.
- ``page``: report.md and report.html from one list of blocks.
- ``write``: write_report (the blocks, the files) and main, the ``report`` command.

The package imports none of them: ``main`` imports ``write`` when called.
"""

from __future__ import annotations

from pathlib import Path


def main(results: str | None = None, out_dir: str = "report",
         wandb_project: str | None = None, skip_bad_lines: bool = False) -> list[Path]:
    """The ``report`` command: :func:`lightning_lth.report.write.main`."""
    from lightning_lth.report import write

    return write.main(results, out_dir, wandb_project, skip_bad_lines)
