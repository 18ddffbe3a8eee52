"""`bookgen runs [FOLDER...]`: run folders side by side, and their validation curves on one chart."""

from __future__ import annotations

import fcntl
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bookgen.errors import BookgenError
from bookgen.fileio import read_json, read_jsonl_torn, written_aside
from bookgen.locks import LOCK_NAME
from bookgen.run_files import INTERRUPTED_MARKER, PREEMPTED_MARKER, RESOLVED_CONFIG, RUN_INFO, SUMMARY


@dataclass(frozen=True, slots=True)
class RunRow:
    folder: Path
    experiment: str
    model: str
    packing: str
    zero_stage: int
    world_size: int | None
    steps: int
    tokens_per_second: float | None
    best_perplexity: float | None
    last_perplexity: float | None
    stop_rate: float | None
    copied_share: float | None
    rouge_l: float | None  # the last evaluation's ROUGE-L of the scored rows (prompt runs)
    memory: tuple[float | None, float | None]  # peak MiB a rank: (planned, measured)
    step_seconds: tuple[float | None, float | None]  # a step's seconds: (planned, measured)
    status: str  # running, finished, preempted, interrupted or failed
    curve: list[tuple[int, float]]  # (step, validation loss)


def find_run_folders(paths: list[Path]) -> list[Path]:
    """Each path is a run folder, or a folder whose subfolders are run folders (``runs/``)."""
    found: list[Path] = []
    for path in paths:
        if (path / RESOLVED_CONFIG).is_file():
            found.append(path)
        elif path.is_dir():
            inner = sorted(p for p in path.iterdir() if (p / RESOLVED_CONFIG).is_file())
            if not inner:
                raise BookgenError(f"{path}: neither a run folder (no {RESOLVED_CONFIG}) nor a folder of run folders")
            found.extend(inner)
        else:
            raise BookgenError(f"{path}: no such folder")
    return found


def read_run(folder: Path) -> RunRow:
    try:
        cfg = yaml.safe_load((folder / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BookgenError(f"{folder / RESOLVED_CONFIG}: cannot read it ({exc})") from exc
    metrics_path = folder / "metrics.jsonl"
    records, damage = [], ""
    try:
        records, torn = read_jsonl_torn(metrics_path) if metrics_path.is_file() else ([], None)
        damage = ", last line torn" if torn is not None else ""
    except (OSError, ValueError) as exc:  # one damaged run is marked; the others are still listed
        damage = f", metrics.jsonl unreadable ({exc})"
    summary, info = _mapping(read_json(folder / SUMMARY)), _mapping(read_json(folder / RUN_INFO))
    steps = max((r["step"] for r in records if "loss" in r), default=0)
    evals = [r for r in records if "perplexity" in r]
    rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    samples = [r for r in records if "samples_stop_rate" in r]
    scored = [r for r in records if "rougeL" in r]
    planned = summary if "memory_planned_mb" in summary else next(
        (r for r in reversed(records) if "memory_planned_mb" in r), {})
    model = cfg.get("model", {})
    return RunRow(
        folder=folder,
        experiment=Path(info["experiment"]).name if info.get("experiment") else "-",
        model=model.get("name_or_path") or (model.get("config") or {}).get("model_type")
        or f"gpt2 {model.get('n_layer')}x{model.get('n_embd')}",
        packing=cfg.get("data", {}).get("packing", "-"),
        zero_stage=cfg.get("deepspeed", {}).get("zero_stage", 0),
        world_size=info.get("world_size"),
        steps=steps,
        tokens_per_second=summary.get("tokens_per_second", rates[-1] if rates else None),
        best_perplexity=min((r["perplexity"] for r in evals), default=None),
        last_perplexity=evals[-1]["perplexity"] if evals else None,
        stop_rate=samples[-1]["samples_stop_rate"] if samples else None,
        copied_share=samples[-1].get("samples_copied_8gram_share") if samples else None,
        rouge_l=scored[-1]["rougeL"] if scored else None,
        memory=(planned.get("memory_planned_mb"), planned.get("memory_measured_mb")),
        step_seconds=(summary.get("step_seconds_planned"), summary.get("step_seconds_measured")),
        status=run_status(folder, summary, steps) + damage,
        curve=[(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r],
    )


def run_status(folder: Path, summary: dict[str, Any], steps: int) -> str:
    """running: a run holds the folder's lock now; finished: the summary covers the last step; preempted: it
    saved and asked to be requeued; interrupted: a Ctrl-C saved and stopped it; failed: it ended any other way
    (an error, a kill)."""
    if _locked(folder / LOCK_NAME):
        return "running"
    if summary.get("steps") is not None and summary["steps"] >= steps:
        return "finished"
    if (folder / PREEMPTED_MARKER).exists():
        return "preempted"
    if (folder / INTERRUPTED_MARKER).exists():
        return "interrupted"
    return "failed"


def _locked(path: Path) -> bool:
    try:
        handle = open(path, encoding="utf-8")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks cannot tell
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def runs_table(rows: list[RunRow]) -> Any:
    from rich.table import Table

    table = Table(title="bookgen runs")
    for name in ("run", "experiment", "model", "packing", "ZeRO", "ranks", "steps", "tokens/s", "best ppl",
                 "last ppl", "stop rate", "copied", "ROUGE-L", "peak MiB plan/run", "step s plan/run", "status"):
        table.add_column(name, justify="left" if name in ("run", "experiment", "model", "packing", "status")
                         else "right")
    for r in rows:
        table.add_row(_shown(r.folder), r.experiment, r.model, r.packing, str(r.zero_stage),
                      _text(r.world_size), str(r.steps), _text(r.tokens_per_second, "{:,.0f}"),
                      _text(r.best_perplexity, "{:.2f}"), _text(r.last_perplexity, "{:.2f}"),
                      _text(r.stop_rate, "{:.0%}"), _text(r.copied_share, "{:.0%}"), _text(r.rouge_l, "{:.3f}"),
                      f"{_text(r.memory[0], '{:,.0f}')}/{_text(r.memory[1], '{:,.0f}')}",
                      f"{_text(r.step_seconds[0], '{:.3f}')}/{_text(r.step_seconds[1], '{:.3f}')}", r.status)
    return table


def _shown(folder: Path) -> str:
    """A run folder as the user would type it: relative to here when it is below here."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _text(value: float | int | None, form: str = "{}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return form.format(value)


def plot_curves(rows: list[RunRow], out_png: Path) -> None:
    """The runs' validation losses against the step, one line a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [r for r in rows if r.curve]
    if not with_curves:
        raise BookgenError("--plot: none of these runs has evaluated yet (no eval_loss in metrics.jsonl)")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in with_curves:
        ax.plot(*zip(*r.curve, strict=True), "o-", label=r.folder.name, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with written_aside(out_png) as tmp:
            fig.savefig(tmp, dpi=100)
    except OSError as exc:
        raise BookgenError(f"--plot {out_png}: cannot write it ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)


def plot_target(path: Path) -> Path:
    """Where ``--plot PATH`` writes, checked before anything is read: an image file in a folder that exists
    (matplotlib would add ``.png`` to a name without a suffix and write somewhere else than it was told)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.is_dir():
        raise BookgenError(f"--plot {path}: a folder; name the image to write, e.g. {path / 'curves.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.suffix[1:].lower() not in formats:
        raise BookgenError(f"--plot {path}: matplotlib cannot write {path.suffix!r} images; end the name in one of "
                           + ", ".join(f".{f}" for f in formats))
    if not path.parent.is_dir():
        raise BookgenError(f"--plot {path}: the folder {path.parent} does not exist")
    return path


def runs_command(paths: list[Path], plot: Path | None, console: Any) -> int:
    from rich.console import Console

    plot = None if plot is None else plot_target(plot)
    rows = [read_run(folder) for folder in find_run_folders(paths or [Path("runs")])]
    out = Console()  # the table goes to stdout, whole when piped (rich would cut it at 80 columns)
    if not out.is_terminal:
        out = Console(width=240)
    out.print(runs_table(rows))
    if plot is not None:
        plot_curves(rows, plot)
        console.print(f"validation curves: {plot}", highlight=False, markup=False)
    return 0
