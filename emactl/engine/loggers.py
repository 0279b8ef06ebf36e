"""Optional experiment loggers: TensorBoard, Weights & Biases and MLflow (``train.loggers``).

``metrics.jsonl`` (:class:`emactl.engine.rundir.MetricsLogger`) is always written and stays
the source of truth: resuming truncates it and ``emactl visualize curves`` reads it. The
back-ends here receive a copy of every record it writes — each number except ``iter`` and
``time`` becomes the scalar ``<kind>/<key>`` at step ``iter`` — and write nothing else. Each is
an optional extra (``pip install 'emactl[wandb]'``); a missing package is one line naming the
extra, found before training starts. A back-end that fails while the run goes on (a full
disk, a network error in wandb's online mode) is dropped with one warning rather than
stopping the training; metrics.jsonl keeps every record.

Offline by default: wandb runs with ``train.wandb_mode: offline`` (files under
``<run_dir>/wandb``; ``wandb sync`` uploads them later) and MLflow writes a SQLite store,
``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts`` (``mlflow ui
--backend-store-uri sqlite:///<run_dir>/mlflow.db`` shows it), unless
``train.mlflow_tracking_uri`` names a server. (MLflow 3 refuses its old file store.)
"""
from __future__ import annotations

import importlib
import secrets
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from rich.console import Console

from ..config import Recipe, TrainConfig, to_dict
from ..errors import UserError
from ..io import ensure_dir, write_text

# logger name → (module to import, the emactl extra that installs it)
PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# What MLflow's default local SQLite store needs besides mlflow itself (also in the extra).
MLFLOW_SQLITE = ("sqlalchemy", "alembic")
SKIPPED_KEYS = ("kind", "iter", "time")

_console = Console(stderr=True, soft_wrap=True)


class Backend(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as ``{"<kind>/<key>": value}``."""
    return {
        f"{record['kind']}/{key}": float(value)
        for key, value in record.items()
        if key not in SKIPPED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _import(name: str, module: str | None = None) -> Any:
    """The package behind logger ``name`` (or ``module``), or a one-line UserError naming the
    extra that installs it."""
    default, extra = PACKAGES[name]
    module = module or default
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"train.loggers: {name} needs the {module.split('.')[-1]} package; install it with "
            f"pip install 'emactl[{extra}]' (or remove {name} from train.loggers)"
        ) from None


def require_loggers(cfg: TrainConfig) -> None:
    """Fail now, on every rank, if a requested back-end's package is missing."""
    for name in dict.fromkeys(cfg.loggers):
        if name != "jsonl":
            _import(name)
        if name == "mlflow" and not cfg.mlflow_tracking_uri:
            for module in MLFLOW_SQLITE:
                _import(name, module)


class TensorBoardLogger:
    """Scalars into ``<run_dir>/tb`` with ``torch.utils.tensorboard``.

    A resumed training passes the first step it logs again as ``purge_step``: TensorBoard then
    hides what the interrupted run had logged from that step on, so each step shows once, as in
    ``metrics.jsonl`` (which the trainer truncates the same way).
    """

    def __init__(self, folder: Path, purge_step: int | None = None) -> None:
        self.writer = _import("tensorboard").SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["iter"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (offline by default) named after the recipe, with its config.

    Its id is kept in ``<run_dir>/wandb/emactl-run-id``, so a resumed training logs into the
    same run: online, wandb resumes it (and ignores the steps it already holds); offline, each
    segment's directory carries the id and ``wandb sync`` uploads them into one run.
    """

    ID_FILE = "emactl-run-id"

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        wandb = _import("wandb")
        t = recipe.train
        id_file = ensure_dir(Path(run_dir) / "wandb") / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=t.wandb_project, name=recipe.name, dir=str(run_dir), id=run_id,
                              resume="allow", mode=t.wandb_mode, config=to_dict(recipe))

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["iter"]))

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """An MLflow run in the experiment named after the recipe, through ``MlflowClient`` (no
    global active run), with the resolved recipe as an artifact.

    Its id is kept in ``<run_dir>/mlflow-run-id``, so a resumed training logs into the same run
    while the store still holds it (steps logged after the last checkpoint, before the
    interruption, then appear twice in its history); otherwise a new run starts.
    """

    ID_FILE = "mlflow-run-id"

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        mlflow = _import("mlflow")
        self._metric = _import("mlflow", "mlflow.entities").Metric
        run_dir = Path(run_dir).resolve()
        uri = recipe.train.mlflow_tracking_uri
        artifacts = None  # a server's own default
        if not uri:
            uri = f"sqlite:///{run_dir / 'mlflow.db'}"
            artifacts = (run_dir / "mlartifacts").as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(recipe.name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(recipe.name, artifacts))
        id_file = run_dir / self.ID_FILE
        self.run_id = self._resumable(id_file.read_text().strip()) if id_file.is_file() else None
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=recipe.name).info.run_id
            write_text(id_file, self.run_id + "\n")
        recipe_file = Path(run_dir) / "recipe.yaml"
        if recipe_file.is_file():
            self.client.log_artifact(self.run_id, str(recipe_file))

    def _resumable(self, run_id: str) -> str | None:
        """``run_id`` marked running again, if the store holds it; else None."""
        try:
            self.client.get_run(run_id)
        except Exception:  # MlflowException: a new store, or the run was deleted
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log(self, record: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        step = int(record["iter"])
        metrics = [self._metric(key, value, now, step) for key, value in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Loggers:
    """The requested back-ends; one that raises is dropped with a warning (see above)."""

    def __init__(self, backends: Sequence[tuple[str, Backend]] = ()) -> None:
        self.backends = list(backends)

    def _guard(self, name: str, action: str, call: Any) -> bool:
        try:
            call()
            return True
        except Exception as e:  # any failure of an optional logger must not stop training
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _console.print(f"[yellow]warning:[/] {name} logger failed to {action} "
                           f"({type(e).__name__}: {first}); metrics.jsonl still has every record")
            return False

    def log(self, record: dict[str, Any]) -> None:
        self.backends = [(n, b) for n, b in self.backends
                         if self._guard(n, "log", lambda b=b: b.log(record))]

    def close(self) -> None:
        for name, backend in self.backends:
            self._guard(name, "close", backend.close)
        self.backends = []


BACKENDS = {"tensorboard": lambda run_dir, recipe, relog_from: TensorBoardLogger(Path(run_dir) / "tb", relog_from),
            "wandb": lambda run_dir, recipe, relog_from: WandbLogger(run_dir, recipe),
            "mlflow": lambda run_dir, recipe, relog_from: MLflowLogger(run_dir, recipe)}


def build_loggers(run_dir: Path, recipe: Recipe, relog_from: int | None = None) -> Loggers:
    """The back-ends ``train.loggers`` names besides ``jsonl`` (always written). A resumed
    training passes ``relog_from``, the first step it logs again (see :class:`TensorBoardLogger`).

    Called on rank 0 only, so a back-end that fails to start (its package imported, see
    :func:`require_loggers`) is dropped with a warning: raising here would leave the other
    ranks waiting in their first collective.
    """
    loggers = Loggers()
    for name in dict.fromkeys(recipe.train.loggers):
        if name == "jsonl":
            continue
        box: list[Backend] = []
        if loggers._guard(name, "start", lambda n=name: box.append(BACKENDS[n](run_dir, recipe, relog_from))):
            loggers.backends.append((name, box[0]))
    return loggers
