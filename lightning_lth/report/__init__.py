"""Turn the per-arm results (results.jsonl or a W&B project) into the paper's tables and figures.

Tables 3-5: test accuracy (%) as mean ± std over seeds, rows sparsity x method, columns rewind
epoch k.  Figs. 3/4: accuracy vs k per sparsity; Fig. 7: accuracy vs sparsity per k; plus the
matching-quality interpolation curves and loss/error barriers before/after matching. With the
store at hand, also each arm's accuracy over its epochs (its CSV log), the study's cost
(events.log) and the published Table 1 (diversity and ensembles, from the kept test outputs). Written as report.md, report.html (one self-contained page), report.csv and PNGs.

The modules, by concern:

- ``aggregate``: what tables and figures both compute from the records (the arms in order,
  mean ± std over seeds, the (sparsity, method, k) cells).
- ``diversity``: the Evci et al. metrics of a group of models' test outputs (pure, tensors).
- ``plots``: every figure, the report's and the match stage's interpolation.png.
- ``load``: results.jsonl and W&B reading, record validation, the arms' CSV logs and the
  connectivity files from the store.
- ``tables``: the accuracy, barrier, matching and cost tables, the CSV rows, markdown.
- ``page``: report.md and report.html from one list of blocks.
- ``write``: write_report (the blocks, the files) and main, the ``report`` command.

Layers: ``plots`` and the ``aggregate`` it draws on sit low, on the foundations (errors, io)
and matplotlib only, because the match stage (experiment/stages.py) draws interpolation.png
with ``plots`` and experiment/ is below report/. The other modules sit at the top (``load``
and ``write`` read experiment.results, ``tables`` experiment.store). So this file imports
none of them: importing ``lightning_lth.report.plots`` from the match stage must not pull in
``load`` -> experiment, an import circle; ``main`` imports ``write`` when called.
"""

from __future__ import annotations

from pathlib import Path


def main(results: str | None = None, out_dir: str = "report",
         wandb_project: str | None = None, skip_bad_lines: bool = False,
         wandb_settings: tuple[str, str] | None = None) -> list[Path]:
    """The ``report`` command: :func:`lightning_lth.report.write.main`."""
    from lightning_lth.report import write

    return write.main(results, out_dir, wandb_project, skip_bad_lines, wandb_settings)
