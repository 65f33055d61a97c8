"""The study at a glance: one progress view over a command's stages, and quiet logs.

On a terminal, ``experiment``, ``prune`` and ``match`` show one live Rich display: the stages
by kind (done / running / waiting), the running stage by name with its epoch and steps, the
study's epochs done / planned and an ETA. Elsewhere (CI, SLURM logs) they print a header
line, one line when each stage starts, one when it ends (with its time, the study's epochs
and the ETA) and a footer: nothing per step.

Lightning's own progress bar is off under a study: Rich allows one live display at a time,
so a RichProgressBar cannot sit inside this one. ``EpochClock``, a callback, feeds the view
instead: each epoch's time (the ETA's measurements) and, on a terminal, each step.

The ETA is the epochs left, each at the mean measured epoch time of its stage's kind (of all
kinds until that kind has run one): epochs are what the plan knows in advance.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TextIO

import lightning as L
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from lightning_lth import __version__
from lightning_lth.experiment.keys import OLDER_RELEASE
from lightning_lth.training.callbacks import completed_epochs

# Third-party noise with nothing for a user to act on (Python warnings, then log lines).
NOISY_WARNINGS = (r".*LeafSpec.*", r".*`tensorboardX` has been removed as a dependency.*",
                  # each Trainer where SLURM is installed; our SLURM jobs run under srun
                  r"The `srun` command is available on your system but is not used")
NOISY_LOGS = ("💡 Tip:", "`weights_only` was not set")
STEP_LOGGING_HINT = r"The number of training batches .* is smaller than the logging interval"
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
STATES = ("done", "running", "waiting")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOGS)


def silence_known_noise() -> None:
    """Every command: drop Lightning's tips, its hint to launch with ``srun`` and the known
    deprecation notes."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Study commands: no per-stage info lines from Lightning (devices, seeds, "fit stopped",
    the mask's sparsity), and no hint on step-logging cadence (stages log per epoch; W&B's
    setup resets Python's once-per-place memory, so it came back at every stage)."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=STEP_LOGGING_HINT)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return str(timedelta(seconds=round(seconds)))


class Estimator:
    """Seconds per epoch by stage kind (and per stage, for kinds that train no epochs)."""

    def __init__(self):
        self.seconds: dict[tuple[str, bool], float] = defaultdict(float)
        self.counts: dict[tuple[str, bool], int] = defaultdict(int)

    def add(self, kind: str, epochs: int, seconds: float) -> None:
        """``epochs`` epochs of a ``kind`` stage took ``seconds`` (0 epochs: a whole stage)."""
        slot = (kind, epochs > 0)
        self.seconds[slot] += seconds
        self.counts[slot] += max(epochs, 1)

    def per_epoch(self, kind: str) -> float | None:
        if self.counts[(kind, True)]:
            return self.seconds[(kind, True)] / self.counts[(kind, True)]
        total = sum(n for (_, trains), n in self.counts.items() if trains)
        return sum(s for (_, trains), s in self.seconds.items() if trains) / total if total \
            else None

    def estimate(self, kind: str, epochs: int) -> float | None:
        """Seconds for ``epochs`` epochs of a ``kind`` stage (a stage without epochs: its
        kind's mean stage time); None when nothing it could use was measured."""
        if epochs == 0:
            n = self.counts[(kind, False)]
            return self.seconds[(kind, False)] / n if n else None
        rate = self.per_epoch(kind)
        return None if rate is None else rate * epochs

    def time_left(self, pending: Iterable[tuple[str, int]]) -> float | None:
        """Seconds for stages of (kind, epochs left): None while a stage with epochs has no
        estimate; a stage without epochs counts 0 until its kind was measured."""
        left = 0.0
        for kind, epochs in pending:
            seconds = self.estimate(kind, epochs)
            if seconds is None and epochs > 0:
                return None
            left += seconds or 0.0
        return left


def plan_table(stages: Sequence, status: Callable[[object], str],
               times: dict[tuple[str, str], float],
               action: Callable[[object], tuple[str, str]]) -> str:
    """The plan as a table: each stage's status, epochs, time (measured where it is done,
    else estimated from the store's finished stages) and what a run does with it and why
    (``Store.action``: reuse, resume, compute, recompute), then the totals."""
    estimator = Estimator()
    measured = {}
    for stage in stages:
        seconds = times.get((stage.kind, stage.key))
        if seconds is not None and status(stage) == "done":
            estimator.add(stage.kind, stage.epochs, seconds)
            measured[stage.key] = seconds
    rows = [("stage", "what", "status", "epochs", "time", "run")]
    states: dict[str, int] = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    recomputed = 0
    for stage in stages:
        state = status(stage)
        states[state] += 1
        verb, why = action(stage)
        if verb == "recompute":
            recomputed += 1
            for reason in why.split("; "):
                reasons[reason] += 1
        if state == "done":
            seconds = duration(measured[stage.key]) if stage.key in measured else "-"
        else:
            estimate = estimator.estimate(stage.kind, stage.epochs)
            seconds = "?" if estimate is None else f"~{duration(estimate)}"
        rows.append(stage.plan_row(state, seconds, f"{verb}: {why}" if why else verb))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join(cell.rjust(w) if i in (3, 4) else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pending = [s for s in stages if status(s) != "done"]
    left = estimator.time_left((s.kind, s.epochs) for s in pending)
    lines += ["", f"total: {len(stages)} stages ("
              + ", ".join(f"{states[s]} {s}" for s in ("done", "partial", "missing")
                          + (("corrupt",) if states["corrupt"] else ()))
              + f"); {sum(s.epochs for s in stages)} epochs, "
              f"{sum(s.epochs for s in pending)} to train; time measured "
              f"{duration(sum(measured.values()))}, estimated left "
              + (duration(left) if left is not None else "? (no epoch measured in this store)")]
    if reasons:
        lines.append(f"recompute: {plural(recomputed, 'stage')} the store holds under "
                     f"another key, because: "
                     + "; ".join(f"{reason} ({count})" for reason, count in sorted(
                         reasons.items(), key=lambda item: -item[1])))
    if reasons.get(OLDER_RELEASE):
        lines.append(f"(this release keys stages by a new policy, docs/keys.md: a store made "
                     f"before lightning_lth {__version__} is computed again once)")
    return "\n".join(lines)


class StudyProgress:
    """Where the stages of one command stand, and the ETA; prints nothing (DDP ranks other
    than 0). The runner reports each stage's start and end, ``EpochClock`` its epochs."""

    def __init__(self, command: str, stages: Sequence, done: set[str] = frozenset(),
                 store: str | Path = "", show_steps: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.command, self.store, self.show_steps, self.clock = command, store, show_steps, clock
        self.stages = list(stages)
        self.state = {s.key: "done" if s.key in done else "waiting" for s in self.stages}
        self.already_done = len(done & set(self.state))
        self.epochs_in: dict[str, int] = {}  # epochs finished by a started stage
        self.started_at: dict[str, float] = {}
        self.steps: tuple[int, int] = (0, 0)
        self.estimator = Estimator()
        self.opened = clock()
        self.current = None
        self.computed = 0

    # -- what the runner and EpochClock report -------------------------------------------
    def started(self, stage, resume: str | None = None) -> None:
        if stage.key not in self.state:  # a stage outside the list given: shown all the same
            self.stages.append(stage)
        self.state[stage.key] = "running"
        self.epochs_in[stage.key] = 0
        self.started_at[stage.key] = self.clock()
        self.current, self.steps = stage, (0, 0)

    def resumed_at(self, stage, epochs: int) -> None:
        """A stage that continues from a checkpoint: ``epochs`` were trained before."""
        self.epochs_in[stage.key] = epochs

    def epoch_done(self, stage, seconds: float) -> None:
        self.epochs_in[stage.key] = self.epochs_in.get(stage.key, 0) + 1
        self.estimator.add(stage.kind, 1, seconds)

    def step(self, stage, done: int, total: int) -> None:
        self.steps = (done, total)

    def finished(self, stage) -> None:
        self.state[stage.key] = "done"
        if stage.epochs == 0:
            self.estimator.add(stage.kind, 0, self.clock() - self.started_at[stage.key])
        self.current = None
        self.computed += 1

    # -- derived ---------------------------------------------------------------------------
    @property
    def planned(self) -> int:
        return sum(s.epochs for s in self.stages)

    def _trained(self, stage) -> int:
        if self.state[stage.key] == "done":
            return stage.epochs
        return min(self.epochs_in.get(stage.key, 0), stage.epochs)

    @property
    def epochs_done(self) -> int:
        return sum(self._trained(s) for s in self.stages)

    def eta(self) -> float | None:
        """Seconds left: every epoch not trained yet at its kind's measured epoch time
        (None before the first measured epoch, when anything is left to train)."""
        return self.estimator.time_left((s.kind, s.epochs - self._trained(s))
                                        for s in self.stages if self.state[s.key] != "done")

    def index(self, stage) -> str:
        width = len(str(len(self.stages)))
        number = next(i for i, s in enumerate(self.stages, 1) if s.key == stage.key)
        return f"[{number:>{width}}/{len(self.stages)}]"

    def header(self) -> str:
        done = [s for s in self.stages if self.state[s.key] == "done"]
        return (f"{self.command}: {len(self.stages)} stages, {self.planned} epochs planned; "
                f"{len(done)} stages ({sum(s.epochs for s in done)} epochs) already done; "
                f"store {self.store}")

    def footer(self, error: BaseException | None = None) -> str:
        took = duration(self.clock() - self.opened)
        trained = self.epochs_done
        if error is not None:
            where = f" in {self.current.name}" if self.current else ""
            return (f"{self.command}: stopped after {took}{where} ({type(error).__name__}); "
                    f"{self.computed} stages computed, epochs {trained}/{self.planned}")
        return (f"{self.command}: finished in {took}; {self.computed} stages computed, "
                f"{self.already_done} already done, epochs {trained}/{self.planned}")

    # -- output (none here) ----------------------------------------------------------------
    def open(self) -> None:
        pass

    def close(self, error: BaseException | None = None, runs: Sequence[str] = ()) -> None:
        pass


class PlainProgress(StudyProgress):
    """Logs that are files: a header, a line per stage start and end, a footer."""

    def __init__(self, *args, out: TextIO | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def say(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)

    def open(self) -> None:
        self.say(self.header())

    def started(self, stage, resume=None):
        super().started(stage, resume)
        about = [plural(stage.epochs, "epoch")] if stage.epochs else []
        about += ["from its resume checkpoint"] if resume else []
        self.say(f"{self.index(stage)} start {stage.name}"
                 + (f" ({', '.join(about)})" if about else ""))

    def finished(self, stage):
        took = self.clock() - self.started_at[stage.key]
        super().finished(stage)
        self.say(f"{self.index(stage)} done  {stage.name} in {duration(took)}; "
                 f"epochs {self.epochs_done}/{self.planned}, ETA {duration(self.eta())}")

    def close(self, error=None, runs=()):
        self.say(self.footer(error))
        for line in wandb_lines(runs):
            self.say(line)


class LiveProgress(StudyProgress):
    """A terminal: one Rich live display, redrawn a few times a second."""

    def __init__(self, *args, console: Console | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.console = console or Console()
        self.live = Live(get_renderable=self.render, console=self.console,
                         refresh_per_second=4, redirect_stdout=True, redirect_stderr=True)

    def render(self) -> Group:
        kinds: dict[str, dict[str, int]] = {}
        epochs: dict[str, list[int]] = {}
        for stage in self.stages:
            counts = kinds.setdefault(stage.kind, dict.fromkeys(STATES, 0))
            counts[self.state[stage.key]] += 1
            done_planned = epochs.setdefault(stage.kind, [0, 0])
            done_planned[0] += self._trained(stage)
            done_planned[1] += stage.epochs
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("stage", *STATES, "epochs"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for kind, counts in kinds.items():
            style = "green" if counts["done"] == sum(counts.values()) else None
            table.add_row(kind, *(str(counts[s] or "") for s in STATES),
                          "{}/{}".format(*epochs[kind]), style=style)
        bars = Table.grid(padding=(0, 1))
        if self.current is not None:
            stage = self.current
            bars.add_row("[bold]running[/]", f"[cyan]{stage.name}[/]",
                         f"epoch {min(self.epochs_in.get(stage.key, 0) + 1, stage.epochs)}"
                         f"/{stage.epochs}" if stage.epochs else "")
            if self.show_steps and self.steps[1]:
                bars.add_row("", ProgressBar(total=self.steps[1], completed=self.steps[0],
                                             width=40), f"step {self.steps[0]}/{self.steps[1]}")
        bars.add_row("[bold]study[/]", ProgressBar(total=max(self.planned, 1),
                                                   completed=self.epochs_done, width=40),
                     f"epochs {self.epochs_done}/{self.planned} · elapsed "
                     f"{duration(self.clock() - self.opened)} · ETA {duration(self.eta())}")
        return Group(f"[bold]{self.command}[/] · store {self.store}", table, bars)

    def open(self) -> None:
        self.live.start()

    def close(self, error=None, runs=()):
        self.live.stop()
        self.console.print(self.footer(error))
        for line in wandb_lines(runs):
            self.console.print(line, highlight=False)


def wandb_lines(runs: Sequence[str]) -> list[str]:
    """The W&B runs of the command, once at the end: a URL each, or the offline folders."""
    if not runs:
        return []
    offline = [run for run in runs if not run.startswith(("http://", "https://"))]
    lines = [f"W&B: {len(runs)} runs"] + [f"  {run}" for run in runs if run not in offline]
    if offline:
        folder = Path(offline[0]).parent
        lines.append(f"  {len(offline)} offline in {folder}; upload with: wandb sync "
                     f"{folder}/offline-run-*")
    return lines


class EpochClock(L.Callback):
    """Each finished epoch's time, and each step on a terminal, to the study's view."""

    def __init__(self, view: StudyProgress, stage):
        self.view, self.stage = view, stage
        self.began = 0.0

    def on_train_start(self, trainer, pl_module):
        self.view.resumed_at(self.stage, completed_epochs(trainer))

    def on_train_epoch_start(self, trainer, pl_module):
        self.began = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.view.step(self.stage, batch_idx + 1, trainer.num_training_batches)

    def on_train_epoch_end(self, trainer, pl_module):
        self.view.epoch_done(self.stage, time.monotonic() - self.began)


@contextlib.contextmanager
def watch(runner, command: str, stages: Sequence) -> Iterator[StudyProgress]:
    """The runner's view of ``stages`` while the block runs them: live on a terminal, plain
    lines elsewhere, nothing on DDP ranks other than 0."""
    kind = StudyProgress
    if runner.dist.is_writer:
        kind = LiveProgress if sys.stdout.isatty() else PlainProgress
    done = {s.key for s in stages if runner.store.status(s) == "done"}
    view = kind(command, stages, done, store=runner.store.root, show_steps=runner.show_steps)
    runner.view = view
    view.open()
    try:
        yield view
    except BaseException as error:
        view.close(error, runner.tracking.runs)
        raise
    view.close(None, runner.tracking.runs)
