"""The training loop behind ``emactl train``: SGD + poly, AMP, accumulation, DDP, resume.

One call, :func:`train`, runs a whole (or resumed) training and the final evaluation. The loop
is deliberately plain, in the style of the torchvision segmentation references: forward,
the loss (``train.loss``, plus the weighted aux loss), backward, step, schedule — with the extras a long
job needs around it.

Reproducibility and resume
    A resumed run continues the *same trajectory* as an uninterrupted one. The checkpoint
    holds the model (with the EMA bases buffer and BN statistics), the optimiser, the LR
    scheduler, the AMP grad scaler, the iteration, each rank's RNG states (torch, CUDA, Python,
    numpy) and the data position (epoch and micro-batch within it). The data order is a pure
    function of ``(train.seed, epoch)`` (a ``DistributedSampler``), and every sample's
    augmentation is drawn from torch's generator re-seeded with a hash of
    ``(train.seed, epoch, rank, position)`` just for that sample — so the batches depend on
    neither the number of data-loading workers nor where a run was interrupted, and a resumed
    run can start mid-epoch without replaying it.

Stopping
    The first SIGINT or SIGTERM sets a flag that is checked after every optimiser step (and
    agreed on by all ranks); the run then saves a checkpoint at the current iteration and
    :func:`train` returns with ``stopped_by`` set; ``emactl train`` exits with 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM). A second signal stops the run at once and says
    which checkpoint is the last: during a periodic validation it first saves the state (which
    validating does not change); during a step it cannot, as that state is half updated. A
    signal during the final evaluation (the final checkpoint is on disk by then) stops it at
    once too: ``emactl eval`` or ``--resume`` redo it. Either way :func:`train` returns with
    ``stopped_by`` set and a message printed.

Non-finite values
    A NaN/inf loss raises :class:`UserError` naming the iteration *before* the bad update is
    applied, and nothing is saved. A finite loss can still leave non-finite weights or BN
    statistics behind (a huge learning rate); such a state is never saved either, so the
    newest checkpoint, which pruning always keeps, is a finite one.

Run directory
    One process at a time trains in a run directory (a lock naming the holder's pid and host;
    the kernel drops it when that process dies, even by ``kill -9``). The folders are checked
    to be writable before any work; a write that fails later (a full disk) stops the run with
    one line naming the file and the space it needs, keeping the previous checkpoint.
    ``--resume`` refuses settings that cannot change mid-run (see :data:`RESUME_MUTABLE`).

Distributed
    Under ``torchrun`` each rank runs this same function. ``train.batch_size`` is the global
    batch: world size × ``train.accum_steps`` × the per-step micro-batch. Only rank 0 writes
    files or prints.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..config import Recipe, to_dict
from ..data import build_dataset
from ..data.loading import next_batch, stop_workers
from ..device import amp_dtype, autocast
from ..errors import UserError
from ..io import ensure_dir, folder_lock
from ..nn.emanet import build_model, ema_units
from ..progress import MeanRateETA, hms
from ..tables import describe_paths
from . import distributed as D
from .checkpoint import (
    CKPT_DIR,
    checkpoint_path,
    first_non_finite,
    latest_checkpoint,
    load_checkpoint,
    load_newest,
    load_state,
    model_state,
    prune_checkpoints,
    recipe_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .cudnn import cudnn_benchmark
from .evaluate import (
    EvalResult,
    describe_setting,
    eval_meta,
    evaluate,
    print_eval,
    resolve_eval_config,
    summary_frame,
    write_eval,
)
from .loggers import build_loggers, require_loggers
from .losses import SegLoss, loss_for
from .optim import build_optimizer, build_scheduler
from .rundir import MetricsLogger, capture_env, check_run_dir, remove_stale_temps, write_env, write_recipe

TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "iteration", "loader", "ranks")
# Recipe keys ``--resume`` may change (a prefix ending in "." covers a section): the length and
# cadence of the run, where it runs and reads from, and how it evaluates. Any other change
# would make the resumed run differ from what its checkpoints and recipe.yaml say.
RESUME_MUTABLE = (
    "name", "out_dir", "data.root", "data.workers", "data.class_names", "model.pretrained",
    "train.iters", "train.val_every", "train.ckpt_every", "train.keep_ckpts",
    "train.log_every", "train.device", "train.compile", "train.cudnn_benchmark", "eval.",
)

_console = Console(stderr=True, soft_wrap=True)


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    ``iteration`` is the last completed iteration; ``seconds`` the wall time of this call;
    ``metrics`` the final evaluation summary (aAcc, mAcc, mIoU, fwIoU in percent), or None when
    the run was stopped by a signal, in which case ``stopped_by`` is the signal number.
    """

    run_dir: Path
    iteration: int
    seconds: float
    metrics: dict[str, float] | None
    stopped_by: int | None = None


# --------------------------------------------------------------------------------------------
# Loss.


def seg_loss(outputs: dict[str, Tensor], labels: Tensor, criterion: SegLoss) -> Tensor:
    """The recipe's loss (``train.loss``, see :mod:`emactl.engine.losses`) of the main head,
    plus ``model.aux_weight ×`` that of the aux head; 0 for a batch without any valid pixel."""
    return criterion(outputs, labels)


# --------------------------------------------------------------------------------------------
# Data: a resumable, seeded, infinite stream of micro-batches.


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of one sample: a 63-bit hash of where it sits in the stream."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is drawn with the RNGs seeded by ``seed``.

    torch's CPU generator, Python's ``random`` and numpy's global generator are seeded for the
    one call and restored afterwards, so the caller's random streams (e.g. dropout when
    ``data.workers=0``) are left untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        gen = torch.default_generator
        torch_state, py_state, np_state = gen.get_state(), random.getstate(), np.random.get_state()
        gen.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


class TrainSampler(Sampler):
    """A ``DistributedSampler`` order that yields ``(index, sample seed)`` from a start position.

    The order is reshuffled every epoch from ``(seed, epoch)``; ``drop_last`` trims the epoch
    to a multiple of the world size so every rank sees the same number of samples.
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int) -> None:
        self.order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.seed, self.rank = seed, rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the epoch."""
        self.start = start

    def per_rank(self) -> int:
        return len(self.order)

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.order):
            if position >= self.start:
                yield index, sample_seed(self.seed, self.epoch, self.rank, position)


def _worker_init(worker_id: int) -> None:
    """Data-loading workers ignore SIGINT/SIGTERM: the main process decides when to stop.

    (A Ctrl-C reaches the whole process group; a worker that died of it would crash the main
    process before it could save its checkpoint.) Workers still exit when the main process dies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class InfiniteLoader:
    """Endless micro-batches over epochs, with a position (epoch, micro-batch) to checkpoint."""

    def __init__(self, loader: DataLoader, sampler: TrainSampler, epoch: int = 0, batch: int = 0) -> None:
        self.loader, self.sampler = loader, sampler
        self.epoch, self.batch = epoch, batch
        self._it: Iterator | None = None

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch * self.loader.batch_size)
                if self.loader.generator is not None:
                    self.loader.generator.manual_seed(sample_seed(self.sampler.seed, self.epoch, -1, 0))
                self._it = iter(self.loader)
            try:
                item = next_batch(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.batch = self.epoch + 1, 0
                continue
            self.batch += 1
            return item

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        """Stop the workers now (not when the garbage collector gets to the iterator)."""
        if self._it is not None:
            stop_workers(self._it)
        self._it = None


# --------------------------------------------------------------------------------------------
# Signals.


class StopNow(BaseException):
    """Raised by :class:`StopSignals` for a signal that must stop the run at once.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int, second: bool) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.second = signum, second


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag; a second one raises :class:`StopNow`.

    With ``immediate`` set (during the final evaluation) the first one raises too. Handlers can
    only be installed from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        second = self.signum is not None
        if not second:
            self.signum = signum
        if second or self.immediate:
            raise StopNow(signum, second)

    def _restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def stop_vote(signals: StopSignals) -> Tensor:
    """This rank's vote to stop: ``[SIGINT received, SIGTERM received]`` as 0/1 floats."""
    return torch.tensor([float(signals.signum == signal.SIGINT), float(signals.signum == signal.SIGTERM)])


def agreed_stop(votes: list[float]) -> int | None:
    """The signal every rank stops on, from :func:`stop_vote` summed over ranks (SIGTERM when
    ranks received different ones); None when no rank voted to stop."""
    sigint, sigterm = votes
    if sigterm:
        return int(signal.SIGTERM)
    return int(signal.SIGINT) if sigint else None


# --------------------------------------------------------------------------------------------
# What a step found, and how the loop shows it.


@dataclass(frozen=True)
class StepResult:
    """One optimiser step, as every rank agreed on it (the values are all-reduced).

    ``loss`` is the global mean loss; ``stop`` the signal a rank voted to stop on, or None.
    """

    loss: float
    stop: int | None = None


@dataclass
class Throughput:
    """Images per second over each ``train.log_every`` window (``ips`` is None until the
    first window is measured, and the progress bar shows "–" until then)."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    iters: int = 0
    ips: float | None = None

    def measure(self, batch_size: int) -> float:
        """Close the current window: its rate, and a new window from now."""
        now = time.perf_counter()
        self.ips = self.iters * batch_size / max(now - self.start, 1e-9)
        self.start, self.iters = now, 0
        return self.ips


class TrainProgress:
    """The training progress bar: iterations, the last step's loss, the lr and img/s, and an
    ETA from this session's mean step time (a resumed run starts part-way)."""

    def __init__(self, total: int, completed: int, enabled: bool) -> None:
        columns = (
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            MeanRateETA(),
        )
        self.progress = Progress(*columns, console=_console, disable=not enabled)
        self.total, self.completed = total, completed

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, completed=self.completed, loss="–",
                                           lr="–", ips="–", first=self.completed)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, iteration: int, loss: float, lr: float, ips: float | None) -> None:
        self.progress.update(self.task, completed=iteration, loss=f"{loss:.4f}", lr=_fmt_lr(lr),
                             ips="–" if ips is None else f"{ips:.1f}")


# --------------------------------------------------------------------------------------------
# Model helpers.


def unused_parameters(model: nn.Module, device: torch.device, size: int = 64) -> list[str]:
    """Names of parameters that get no gradient in a training step (probed on a copy).

    E.g. the first 1×1 conv of the EMA unit with ``model.ema.grad=none``: DDP needs
    ``find_unused_parameters=True`` for those, which costs a graph traversal every step, so it
    is only switched on when this finds any. The probe runs on a deep copy and inside
    ``fork_rng``, so neither the model nor the random streams change. Collective under DDP
    (the EMA unit all-reduces its bases): every rank must call it.
    """
    probe = copy.deepcopy(model).train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.randn(2, 3, size, size, device=device)
        out = probe(x)
        sum(v.float().mean() for v in out.values()).backward()
    return [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]


def average_bn_stats(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (no-op in a single process).

    With plain BN under DDP (always on the CPU, where SyncBN does not exist) each rank keeps
    its own running statistics, and ``broadcast_buffers=False`` leaves them apart. Averaging
    them before every validation and checkpoint makes all ranks evaluate, save and resume the
    same model. With SyncBN they are equal already and averaging leaves them so.
    """
    if D.get_world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            D.all_reduce(m.running_mean, "mean")
            D.all_reduce(m.running_var, "mean")


def bases_digest(model: nn.Module) -> str:
    """A hash of every EMA unit's bases, to check that replicas agree."""
    h = hashlib.sha1()
    for unit in ema_units(model):
        h.update(unit.mu.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _no_buffer_broadcast() -> dict[str, bool]:
    """DDP's keyword for "do not broadcast buffers before every forward", old or new name."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}



def _fmt_lr(lr: float) -> str:
    return f"{lr:.3e}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two plain-dict recipes: ``{key: (old, new)}``.

    Keys only one side has (a setting added or removed between emactl versions) are skipped.
    """
    before, after = _flatten(old), _flatten(new)
    return {k: (before[k], after[k]) for k in after if k in before and before[k] != after[k]}


def _mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MUTABLE)


# --------------------------------------------------------------------------------------------
# The trainer.


class _Trainer:
    """State and steps of one training run; :func:`train` is the public entry point."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool, progress: bool, info: D.DistInfo) -> None:
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = run_dir
        self.info = info
        self.device = info.device
        self.main = info.is_main
        self.show_progress = progress and self.main
        check_run_dir(run_dir, resume)
        self.resume_from: Path | None = None
        self.ckpt: dict[str, Any] | None = None
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        if resume:
            self._load_resume_checkpoint()
        cfg = self.cfg

        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise UserError("train.amp=fp16 needs CUDA; on the CPU use train.amp=bf16 or none")
        per_step = info.world_size * cfg.accum_steps
        if cfg.batch_size % per_step:
            raise UserError(
                f"train.batch_size={cfg.batch_size} is the global batch and must be divisible by "
                f"world size {info.world_size} × train.accum_steps {cfg.accum_steps} = {per_step}"
            )
        self.micro = cfg.batch_size // per_step

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        data = recipe.data
        self.train_set = build_dataset(data, data.train_split, train=True)
        self.val_set = build_dataset(data, data.val_split, train=False)
        self.num_classes = self.train_set.num_classes
        self.ignore_index = self.train_set.ignore_index
        if len(self.val_set) == 0:
            raise UserError(f"dataset {data.name!r} split {data.val_split!r} holds no images")
        self.eval_cfg = resolve_eval_config(recipe)
        require_loggers(cfg)
        self.criterion = loss_for(recipe, self.num_classes, self.ignore_index, self.show_progress)

        self._build_model()
        self._build_loader()
        # Each rank draws its own dropout masks; a resume replaces this with the saved states.
        torch.manual_seed(cfg.seed + info.rank)
        self.iteration = 0
        self.elapsed = 0.0
        self.window = [0.0, 0]  # loss sum and count since the last train log line
        if self.ckpt is not None:
            self._restore()

    # ---- set-up

    def _load_resume_checkpoint(self) -> None:
        """The newest checkpoint that loads (rank 0 chooses; corrupt newer ones are set aside).

        Its recipe is compared with this one: keys outside :data:`RESUME_MUTABLE` must not
        change; changed ones that may are kept in ``resume_changes`` and reported.
        """
        found = load_newest(self.run_dir, set_aside=True) if self.main else None
        path = found[0] if found is not None else None
        if self.info.distributed:
            path = D.broadcast_object(path)
        if path is None:
            return
        ckpt = found[1] if found is not None else load_checkpoint(path)
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        if missing:
            raise UserError(f"{path}: not a training checkpoint (no {', '.join(missing)}); cannot resume from it")
        changes = recipe_changes(ckpt["recipe"], to_dict(self.recipe))
        fixed = {k: v for k, v in changes.items() if not _mutable(k)}
        if fixed:
            listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
            raise UserError(
                f"{path}: --resume cannot change {listed}: the run was trained with the old values; "
                "resume without these changes, or start a new run with --name"
            )
        self.resume_from, self.ckpt, self.resume_changes = path, ckpt, changes

    def _build_model(self) -> None:
        cfg, dev = self.cfg, self.device
        model_cfg = self.recipe.model
        if self.ckpt is not None:  # the checkpoint holds every weight: skip fetching ImageNet ones
            model_cfg = dataclasses.replace(model_cfg, pretrained=None)
        model = build_model(model_cfg, self.num_classes).to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.ckpt is not None:
            load_state(model, self.ckpt["model"], str(self.resume_from))
        unused: list[str] = []
        if self.info.distributed:
            unused = unused_parameters(model, dev)
            if unused and self.main:
                _console.print(
                    f"DDP: {len(unused)} parameter tensors get no gradient (e.g. {unused[0]}); "
                    "using find_unused_parameters=True"
                )
        model = D.convert_sync_bn(model, dev, cfg.sync_bn)
        self.model = model
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "fp16")
        self.ddp: DistributedDataParallel | None = None
        forward_model: nn.Module = model
        if self.info.distributed:
            # No buffer broadcast before each forward (broadcast_buffers=False; newer PyTorch
            # calls it forward_sync_buffers=False and deprecates the old name). By default DDP
            # copies rank 0's buffers to every rank before each forward pass. The EMA unit
            # already all-reduces its bases update, so the bases agree without it — and with
            # it, rank 0's buffer would silently overwrite the others every step, hiding any
            # bug in that all-reduce, at the cost of a broadcast of every buffer per step. BN
            # statistics are averaged explicitly before validation and checkpoints instead
            # (see average_bn_stats).
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=bool(unused),
                **_no_buffer_broadcast(),
            )
            forward_model = self.ddp
        self.eager_model = forward_model
        self.forward_model = forward_model
        self.compile_pending = False
        if cfg.compile:
            try:
                self.forward_model = torch.compile(forward_model)
                self.compile_pending = True
            except Exception as e:  # unsupported platform or Python version
                self._warn_compile(e)

    def _warn_compile(self, e: BaseException) -> None:
        if self.main:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _console.print(f"[yellow]warning:[/] torch.compile failed ({type(e).__name__}: {first}); training without it")

    def _build_loader(self) -> None:
        cfg, info = self.cfg, self.info
        self.sampler = TrainSampler(self.train_set, info.world_size, info.rank, cfg.seed)
        if self.sampler.per_rank() < self.micro:
            raise UserError(
                f"dataset {self.recipe.data.name!r} split {self.recipe.data.train_split!r} holds "
                f"{len(self.train_set)} images, fewer than one global batch of train.batch_size={cfg.batch_size}"
            )
        workers = self.recipe.data.workers
        generator = torch.Generator()
        generator.manual_seed(cfg.seed)
        loader = DataLoader(
            SeededSamples(self.train_set),
            batch_size=self.micro,
            sampler=self.sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init,
            generator=generator,
            persistent_workers=False,
        )
        self.loader = InfiniteLoader(loader, self.sampler)

    def _restore(self) -> None:
        ckpt, path = self.ckpt, self.resume_from
        assert ckpt is not None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{path}: optimizer state does not fit this recipe's parameter groups ({e})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        if self.iteration > self.cfg.iters:
            raise UserError(
                f"{path}: checkpoint is at iteration {self.iteration}, beyond train.iters={self.cfg.iters}"
            )
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        window = ckpt.get("loss_window", [0.0, 0])
        self.window = [float(window[0]), int(window[1])]
        pos = ckpt["loader"]
        epoch, batch = int(pos["epoch"]), int(pos["batch"])
        same_layout = int(pos.get("micro_batch", self.micro)) == self.micro and int(
            pos.get("world_size", self.info.world_size)
        ) == self.info.world_size
        if not same_layout:
            samples = batch * int(pos["micro_batch"]) * int(pos["world_size"])
            batch = samples // (self.micro * self.info.world_size)
            if self.main:
                _console.print(
                    "[yellow]warning:[/] resuming with a different world size or micro-batch: "
                    "the data stream continues from the same epoch and sample count, not the same batches"
                )
        self.loader.epoch, self.loader.batch = epoch, batch
        ranks = ckpt["ranks"]
        set_rng_state(ranks[self.info.rank % len(ranks)]["rng"], self.device)
        self.ckpt = None  # free the memory

    # ---- steps

    def _forward(self, images: Tensor) -> dict[str, Tensor]:
        if not self.compile_pending:
            return self.forward_model(images)
        # torch.compile compiles lazily, on the first call: fall back to eager if that fails.
        try:
            out = self.forward_model(images)
        except UserError:
            raise
        except Exception as e:
            self._warn_compile(e)
            self.forward_model = self.eager_model
            out = self.forward_model(images)
        self.compile_pending = False
        return out

    def step(self, stop_flags: Tensor) -> StepResult:
        """One optimiser step over ``accum_steps`` micro-batches.

        ``stop_flags`` (this rank's vote, see :func:`stop_vote`) is all-reduced together with
        the loss, so every rank gets the same global mean loss and the same stop decision.
        A non-finite loss raises before the update is applied.
        """
        cfg, dev = self.cfg, self.device
        loss_sum = torch.zeros((), device=dev)
        for k in range(cfg.accum_steps):
            images, labels = next(self.loader)
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = k == cfg.accum_steps - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with autocast(dev, amp_dtype(cfg.amp)):
                    outputs = self._forward(images)
                loss = seg_loss(outputs, labels, self.criterion)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach()
        stats = torch.cat([(loss_sum / cfg.accum_steps).reshape(1), stop_flags.to(dev)])
        D.all_reduce(stats, "sum")
        values = stats.tolist()
        loss_value = values[0] / self.info.world_size
        if not math.isfinite(loss_value):
            raise self._non_finite(f"loss is {loss_value}", self.iteration + 1, "applying or saving that step")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        return StepResult(loss_value, agreed_stop(values[1:]))

    def _non_finite(self, what: str, iteration: int, skipped: str) -> UserError:
        kept = latest_checkpoint(self.run_dir)
        return UserError(
            f"{what} at iteration {iteration}; stopped without {skipped} "
            f"(last good checkpoint: {kept if kept else 'none'}); "
            "lower train.lr, add warm-up or try train.amp=none"
        )

    def save(self) -> Path:
        """Checkpoint the current state (collective: every rank contributes its RNG states).

        A state holding NaN or inf is refused (every rank sees the same, averaged state), so
        the previous checkpoint stays the newest and is never pruned.
        """
        average_bn_stats(self.model)
        ranks = D.all_gather_object({"rng": rng_state(self.device), "bases": bases_digest(self.model)})
        path = checkpoint_path(self.run_dir, self.iteration)
        weights = model_state(self.model)
        bad = first_non_finite(weights) or first_non_finite(self.optimizer.state_dict()["state"])
        if bad is not None:
            raise self._non_finite(f"{bad} holds NaN or inf", self.iteration, "saving it")
        if self.main:
            state = {
                "model": weights,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "iteration": self.iteration,
                "recipe": recipe_state(self.recipe),
                "loader": {**self.loader.state(), "micro_batch": self.micro, "world_size": self.info.world_size},
                "ranks": ranks,
                "elapsed": self.elapsed,
                "loss_window": list(self.window),
                "world_size": self.info.world_size,
            }
            save_checkpoint(path, state)
            prune_checkpoints(self.run_dir, self.cfg.keep_ckpts)
        return path

    def validate(self, progress: bool) -> EvalResult:
        """Evaluate on the val split (all ranks; the confusion matrix is reduced across them).

        Runs inside ``fork_rng`` so that validating does not change the training trajectory.
        """
        average_bn_stats(self.model)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate(
                self.model,
                self.val_set,
                self.eval_cfg,
                self.num_classes,
                self.ignore_index,
                self.device,
                progress=progress,
                workers=self.recipe.data.workers,
            )
        self.model.train()
        return result

    # ---- the run

    def run(self) -> TrainResult:
        start = time.perf_counter()
        logger = MetricsLogger(self.run_dir, enabled=self.main)
        if self.main:
            self._begin(logger)
        stopped_by: int | None = None
        metrics: dict[str, float] | None = None
        self.model.train()
        try:
            with StopSignals() as signals:
                stopped_by = self._loop(signals, logger)
                if stopped_by is None:
                    stopped_by = self._agreed_signal(signals)
                    if stopped_by is not None:
                        self._say_complete(f"stopped by {signal.Signals(stopped_by).name} at iteration "
                                           f"{self.iteration}, before the final evaluation")
                    else:
                        signals.immediate = True
                        metrics = self._final(logger)
        except StopNow as e:
            stopped_by = e.signum
            name = signal.Signals(e.signum).name
            if e.second:
                self._say(f"stopped by a second {name} at iteration {self.iteration}, without saving; the last "
                          f"checkpoint is {latest_checkpoint(self.run_dir) or 'none'} (continue with --resume)")
            else:
                self._say_complete(f"stopped by {name} during the final evaluation")
        finally:
            self.loader.close()
            logger.close()
        seconds = time.perf_counter() - start
        if self.main and metrics is not None:
            _console.print(f"total time {hms(seconds)}; the training steps took {hms(self.elapsed)} "
                           "(summed over resumes)", highlight=False)
        return TrainResult(self.run_dir, self.iteration, seconds, metrics, stopped_by)

    def _begin(self, logger: MetricsLogger) -> None:
        """Rank 0: write recipe.yaml and env.json, trim metrics.jsonl to the resumed
        iteration, attach the recipe's loggers and say what runs where."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.run_dir)
        write_recipe(self.run_dir, self.recipe)
        resumed = self.iteration if self.resume_from is not None else None
        env = capture_env(self.device, self.info.world_size, cfg.amp, resumed)
        if self.resume_changes:
            env["resume_changes"] = {
                k: {"checkpoint": old, "now": new} for k, (old, new) in self.resume_changes.items()
            }
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.resume_changes.items())
            _console.print(f"resuming with changed settings: {listed}", markup=False, highlight=False)
        write_env(self.run_dir, env)
        keep_val_at = self.iteration < cfg.iters  # resumed at the end, it validates again
        logger.truncate(self.iteration, keep_val_at=keep_val_at)
        relog_from = None if resumed is None else (self.iteration + 1 if keep_val_at else self.iteration)
        logger.attach(build_loggers(self.run_dir, self.recipe, relog_from))
        where = f"resuming {self.resume_from} at iteration {self.iteration}" if resumed is not None else "training"
        _console.print(
            f"{where} → {self.run_dir} on {self.device} × {self.info.world_size} "
            f"(global batch {cfg.batch_size} = {self.info.world_size} × {cfg.accum_steps} × {self.micro})"
        )

    def _loop(self, signals: StopSignals, logger: MetricsLogger) -> int | None:
        """Train up to ``train.iters``; the signal that stopped the run early, or None.

        Each iteration: one step, its train log line and progress, the periodic validation,
        then either the stop a rank voted for (saving first) or the checkpoint when one is due.
        """
        cfg = self.cfg
        rate = Throughput()
        with TrainProgress(cfg.iters, self.iteration, enabled=self.show_progress) as bar:
            while self.iteration < cfg.iters:
                lr = self._base_lr()
                started = time.perf_counter()
                with cudnn_benchmark(cfg.cudnn_benchmark):
                    result = self.step(stop_vote(signals))
                self.elapsed += time.perf_counter() - started
                self._log_train(logger, rate, result.loss, lr)
                bar.update(self.iteration, result.loss, lr, rate.ips)
                if self._validation_due():
                    stopped = self._validate_during_training(logger)
                    if stopped is not None:
                        return stopped
                if result.stop is not None:
                    return self._stop(result.stop)
                if self._checkpoint_due():
                    self.save()
        return None

    def _stop(self, signum: int) -> int:
        """Stop on a signal all ranks agreed on: save the state after this step, say how to continue."""
        path = self.save()
        if self.main:
            _console.print(f"stopped by {signal.Signals(signum).name} at iteration {self.iteration}; "
                           f"saved {path} (continue with --resume)")
        return signum

    def _base_lr(self) -> float:
        """The schedule's learning rate (the first group's, without its ``lr_mult``)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_mult", 1.0)

    def _log_train(self, logger: MetricsLogger, rate: Throughput, loss: float, lr: float) -> None:
        """Add the step's loss to the window; every ``train.log_every`` iterations write its
        mean as a train line of metrics.jsonl and start a new window."""
        self.window[0] += loss
        self.window[1] += 1
        rate.iters += 1
        if self.iteration % self.cfg.log_every:
            return
        logger.log(
            {
                "kind": "train",
                "iter": self.iteration,
                "loss": self.window[0] / max(self.window[1], 1),
                "lr": lr,
                "img_per_s": rate.measure(self.cfg.batch_size),
                "time": round(self.elapsed, 3),
            }
        )
        self.window = [0.0, 0]

    def _validate_during_training(self, logger: MetricsLogger) -> int | None:
        """The periodic validation; the signal that stopped it, or None.

        A second signal during it saves first: validation changes no training state (eval
        mode, fork_rng), so the state after this step is whole and is saved rather than lost.
        """
        try:
            result = self.validate(progress=False)
        except StopNow as e:
            path = self.save()
            self._say(f"stopped by {signal.Signals(e.signum).name} during validation at iteration "
                      f"{self.iteration}; saved {path} (continue with --resume)")
            return e.signum
        self._log_val(logger, result.summary)
        if self.main:
            _console.print(f"iter {self.iteration}: " + "  ".join(f"{k} {v:.2f}" for k, v in result.summary.items()))
        return None

    def _validation_due(self) -> bool:
        """Every ``train.val_every`` iterations, except at the end, where the final evaluation runs."""
        return bool(self.cfg.val_every) and self.iteration % self.cfg.val_every == 0 and self.iteration < self.cfg.iters

    def _checkpoint_due(self) -> bool:
        return self.iteration % self.cfg.ckpt_every == 0 or self.iteration == self.cfg.iters

    def _say(self, message: str) -> None:
        if self.main:
            _console.print(message, markup=False, highlight=False)

    def _say_complete(self, stopped: str) -> None:
        """A stop once training is complete: the final checkpoint is saved; only the tables are not."""
        self._say(f"{stopped}; training is complete and saved in {latest_checkpoint(self.run_dir)}; "
                  f"`emactl eval {self.run_dir}` writes the tables")

    def _agreed_signal(self, signals: StopSignals) -> int | None:
        """A signal that arrived after the last step's flags were taken, agreed by all ranks."""
        return agreed_stop(D.all_reduce(stop_vote(signals).to(self.device), "sum").tolist())

    def _log_val(self, logger: MetricsLogger, summary: dict[str, float]) -> None:
        logger.log({"kind": "val", "iter": self.iteration, **{k: float(v) for k, v in summary.items()}})

    def _final(self, logger: MetricsLogger) -> dict[str, float]:
        result = self.validate(progress=self.show_progress)
        ckpt = checkpoint_path(self.run_dir, self.iteration)
        result.meta.update(eval_meta(self.eval_cfg, self.recipe.data.val_split, self.model, self.iteration,
                                     ckpt.relative_to(self.run_dir) if ckpt.is_file() else None))
        self._log_val(logger, result.summary)
        if self.main:
            out = self.run_dir / "eval"
            names = [str(n) for n in result.per_class["class"]]
            paths = write_eval(result, out, names)
            setting = describe_setting(summary_frame(result).iloc[0].to_dict())
            print_eval(result, title=f"{self.recipe.name}: {setting}")
            _console.print(f"wrote {describe_paths(paths)}", markup=False, highlight=False)
        return {k: float(v) for k, v in result.summary.items()}


def train(recipe: Recipe, run_dir: Path | None = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``recipe`` into ``run_dir`` (default ``out_dir/name``), then evaluate on val.

    ``resume`` continues from the run's newest checkpoint (or starts afresh if it has none);
    without it an existing run with checkpoints is refused. Under ``torchrun`` every rank calls
    this; the process group is set up from the environment and destroyed at the end.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.out_dir) / recipe.name
    info = D.init_distributed(recipe.train.device)
    try:
        with _run_dir_lock(run_dir, info):
            return _Trainer(recipe, run_dir, resume, progress, info).run()
    finally:
        D.cleanup()


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path, info: D.DistInfo) -> Iterator[None]:
    """Check the run's folders can be written and hold its lock (rank 0; all ranks agree).

    A refusal on rank 0 (another process trains here, a folder cannot be written) is raised
    on every rank, so that none waits for the others in a collective.
    """
    if not info.is_main:
        refusal = D.broadcast_object(None) if info.distributed else None
        if refusal is not None:
            raise UserError(refusal)
        yield
        return
    with contextlib.ExitStack() as stack:
        error: UserError | None = None
        try:
            for folder in (run_dir, run_dir / CKPT_DIR, run_dir / "eval"):
                ensure_dir(folder, "--out or --name")
            stack.enter_context(folder_lock(
                run_dir, "emactl train", "wait for it to finish, or choose another --name"))
        except UserError as e:
            error = e
        if info.distributed:
            D.broadcast_object(str(error) if error is not None else None)
        if error is not None:
            raise error
        yield
