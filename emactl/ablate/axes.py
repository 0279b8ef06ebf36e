"""Ablation axes: parsing the comma-separated CLI lists and expanding them into cells.

An *axis* is one column of the results table with the values it takes. Every axis but
``eval_iters`` is *train-side*: each combination of train-side values (and each seed) is one
*cell*, i.e. one training run. ``eval_iters`` is *eval-side*: every trained cell is evaluated
at each of its values, which costs no training.

EM iterations come in two forms:

* ``--iters 1,3,5`` sets train T and eval T together (a diagonal: 3 runs, each evaluated at its
  own T);
* ``--train-iters`` and ``--eval-iters`` set them separately (the paper's train T × eval T grid).

Rules the expansion applies (each announced once by a note):

* ``bases_update=backprop`` needs ``grad=full`` (there is no gradient to update the bases
  otherwise). When ``grad`` is not swept, the backprop cells train with ``grad=full`` and a
  ``grad`` column shows it; when ``grad`` is swept, the impossible combinations are skipped.
* The EMA-only axes (T, bases update, normalisation, grad, K, momentum) mean nothing for a head
  without an EMA unit (``--heads fcn,...``): those cells get one run with the axes left empty.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import yaml

from ..config import apply_overrides, from_dict, set_path
from ..errors import UserError
from ..lists import split_values
from ..nn.choices import BASES_UPDATES, GRAD_MODES, NORMS

IterMode = Literal["diagonal", "grid", "none"]

EMA_KEY = "model.ema"
RESERVED_KEYS = ("name", "out_dir")


@dataclass(frozen=True)
class AxisSpec:
    """A named axis: its table column, CLI option, recipe key and value parser."""

    column: str
    option: str
    key: str | None
    ema_only: bool
    parse: Callable[[str, str], Any]
    label: Callable[[Any], str]
    example: str = ""  # the values the help shows, e.g. "1,3,5" (choice axes list theirs)
    meaning: str = ""  # the rest of the help, e.g. ": number of bases K."
    values: Callable[[], Sequence[str]] | None = None  # a choice axis's allowed values

    @property
    def param(self) -> str:
        """The keyword this axis takes in :func:`parse_axes` and the CLI: ``--bases-update`` → ``bases_update``."""
        return self.option.lstrip("-").replace("-", "_")

    def help(self) -> str:
        listed = ",".join(self.values()) if self.values is not None else self.example
        return f"Comma-separated list, e.g. {listed}{self.meaning}"


def _choices(values: Callable[[], Sequence[str]]) -> dict[str, Any]:
    """The parser and the help listing of an axis whose values are ``values()``."""
    return {"parse": _choice_parser(values), "values": values}


def _int_value(option: str, text: str) -> int:
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) <= 0:
        raise UserError(f"{option}: got {text.strip()!r}; expected positive integers separated by commas, e.g. 1,3,5")
    return int(text)


def _momentum_value(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{option}: got {text.strip()!r}; expected numbers in [0, 1] separated by commas, e.g. 0.5,0.9")
    return value


def _choice_parser(values: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[str, str], str]:
    """A parser accepting one of ``values``: a sequence, or a function that lists them when a
    value is parsed (the head registry, which imports torch)."""

    def parse(option: str, text: str) -> str:
        value = text.strip()
        allowed = list(values() if callable(values) else values)
        if value not in allowed:
            raise UserError(f"{option}: got {value!r}; choose from {', '.join(allowed)}")
        return value

    return parse


def _head_names() -> list[str]:
    from ..nn.heads import CONTEXTS  # imports torch: not when the CLI starts and imports this module

    return CONTEXTS.names()


def _has_ema_unit(head: str) -> bool:
    from ..nn.heads import has_ema_unit  # torch, as above

    return has_ema_unit(head)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


AXES: dict[str, AxisSpec] = {
    a.column: a
    for a in (
        AxisSpec("train_iters", "--train-iters", "model.ema.iters", True, _int_value, lambda v: f"T{v}",
                 "1,3,5", ": T in training (with --eval-iters: the train T × eval T grid)."),
        AxisSpec("eval_iters", "--eval-iters", None, True, _int_value, lambda v: f"evalT{v}",
                 "1,2,3,4,5", ": T at test time; every trained cell is evaluated at each, no training."),
        AxisSpec("bases_update", "--bases-update", "model.ema.bases_update", True, label=lambda v: f"update-{v}",
                 meaning=" (backprop cells train with grad=full).", **_choices(lambda: BASES_UPDATES)),
        AxisSpec("norm", "--norm", "model.ema.norm", True, label=lambda v: f"norm-{v}",
                 meaning=": normalisation of the bases.", **_choices(lambda: NORMS)),
        AxisSpec("grad", "--grad", "model.ema.grad", True, label=lambda v: f"grad-{v}",
                 meaning=": gradient through the EM iterations.", **_choices(lambda: GRAD_MODES)),
        AxisSpec("head", "--heads", "model.head", False, label=lambda v: f"head-{v}",
                 meaning=": the context module.", **_choices(_head_names)),
        AxisSpec("bases", "--bases", "model.ema.bases", True, _int_value, lambda v: f"K{v}",
                 "16,32,64,128", ": number of bases K."),
        AxisSpec("momentum", "--momentum", "model.ema.momentum", True, _momentum_value, lambda v: f"m{_num(v)}",
                 "0.5,0.9", ": weight of the old bases in the moving average."),
    )
}
TRAIN_SIDE = [c for c in AXES if c != "eval_iters"]


def parse_list(option: str, text: str, parse: Callable[[str, str], Any]) -> list[Any]:
    """Parse a comma-separated list; empty items and repeated values are errors."""
    items = split_values(text)
    if not text.strip() or any(not t.strip() for t in items):
        raise UserError(f"{option}: got {text!r}; expected a comma-separated list of values, e.g. {option} a,b")
    values = [parse(option, t) for t in items]
    seen: list[Any] = []
    for v in values:
        if v in seen:
            raise UserError(f"{option}: value {v!r} is given twice")
        seen.append(v)
    return values


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


@dataclass
class Axes:
    """What to sweep: named axes and ``--set`` axes in table order, and plain overrides."""

    values: dict[str, list[Any]] = field(default_factory=dict)
    iter_mode: IterMode = "none"
    overrides: list[str] = field(default_factory=list)

    @property
    def train_side(self) -> list[str]:
        return [c for c in self.values if c != "eval_iters"]

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values, "iter_mode": self.iter_mode, "overrides": list(self.overrides)}


def parse_axes(*, iters: str | None = None, sets: Sequence[str] = (), **texts: str | None) -> Axes:
    """Turn the CLI's strings into :class:`Axes`; every bad value is a one-line UserError.

    ``texts`` holds each axis's comma-separated values by its :attr:`AxisSpec.param`
    (``train_iters="1,3"``, ``heads="ema,fcn"``); ``iters`` sets train and eval T together.
    """
    by_param = {spec.param: spec for spec in AXES.values()}
    unknown = sorted(set(texts) - set(by_param))
    if unknown:
        raise TypeError(f"parse_axes: unknown axes {unknown}; known: {sorted(by_param)}")
    axes = Axes()
    if iters is not None:
        if texts.get("train_iters") is not None or texts.get("eval_iters") is not None:
            raise UserError("--iters sets train and eval T together; use it alone, or --train-iters with --eval-iters")
        ts = parse_list("--iters", iters, _int_value)
        axes.values["train_iters"] = ts
        axes.values["eval_iters"] = list(ts)
        axes.iter_mode = "diagonal"
    for param, spec in by_param.items():
        text = texts.get(param)
        if text is not None:
            axes.values[spec.column] = parse_list(spec.option, text, spec.parse)
    if iters is None and "eval_iters" in axes.values:
        axes.iter_mode = "grid"
    named_keys = {spec.key: spec for spec in AXES.values() if spec.key}
    for item in sets:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2,..., e.g. --set train.lr=0.01,0.02")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in named_keys:
            spec = named_keys[key]
            if spec.column in axes.values:
                raise UserError(f"--set {key}: already swept by {spec.option}")
        if key in axes.values:
            raise UserError(f"--set {key}: given twice")
        texts = split_values(raw)
        if len(texts) == 1:
            axes.overrides.append(f"{key}={raw}")
            continue
        if key in named_keys:
            raise UserError(f"--set {key}=...: sweep it with {named_keys[key].option} {raw}")
        if key in RESERVED_KEYS or key in ("train.seed", "model.ema.eval_iters", "eval.iters"):
            hint = {"train.seed": "use --seeds N", "model.ema.eval_iters": "use --eval-iters",
                    "eval.iters": "use --eval-iters"}.get(key, "the sweep names its runs itself")
            raise UserError(f"--set {key}: cannot be swept ({hint})")
        values = parse_list(f"--set {key}", raw, lambda _o, t: _yaml_value(t))
        axes.values[key] = values
    return axes


# --------------------------------------------------------------------------------------------
# Cells.


@dataclass
class Cell:
    """One training run of the sweep (or the one source run of a ``--from`` sweep).

    ``values`` maps every train-side column and ``seed`` to this cell's value (None where an
    axis does not apply); ``recipe`` is the complete recipe dictionary to train;
    ``eval_iters`` lists the eval T values to evaluate it at (``[None]``: the model's own);
    ``source`` is the checkpoint of a ``--from`` sweep, which is evaluated and never trained.
    """

    name: str
    values: dict[str, Any]
    recipe: dict[str, Any]
    eval_iters: list[int | None]
    source: str | None = None


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    set_path(data, key.split("."), value, key)


def _get_key(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def safe_label(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``.+-`` made one ``-``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "x"


def cell_label(column: str, value: Any) -> str:
    """A short, file-name-safe label for one axis value, e.g. ``T3``, ``norm-l2``, ``lr-0.01``."""
    if column in AXES:
        return safe_label(AXES[column].label(value))
    return safe_label(f"{column.rsplit('.', 1)[-1]}-{_num(value)}")


def cell_name(values: dict[str, Any]) -> str:
    """``T3_norm-l2_seed0``: the labels of the values that apply, then the seed."""
    parts = [cell_label(c, v) for c, v in values.items() if c != "seed" and v is not None]
    parts.append(f"seed{values['seed']}")
    name = "_".join(parts)
    if len(name) > 120:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:100]}_{digest}"
    return name


def _key_of(column: str) -> str:
    spec = AXES.get(column)
    return spec.key if spec is not None and spec.key else column


def _ordered(columns: Sequence[str]) -> list[str]:
    """Named axes in table order, then ``--set`` keys in the order given."""
    named = [c for c in AXES if c in columns]
    return named + [c for c in columns if c not in AXES]


def expand(
    base: dict[str, Any], axes: Axes, seeds: Sequence[int], source: str = "recipe"
) -> tuple[list[Cell], list[str]]:
    """All cells of the sweep (with validated recipes) and the notes to print once.

    ``base`` is the recipe dictionary with the plain overrides applied; ``seeds`` the
    ``train.seed`` of each repetition. With an iteration axis, every EMA cell carries its
    train T (the recipe's when only eval T is swept), so the T table always has rows.
    """
    notes: list[str] = []
    swept = axes.train_side
    for column in swept:
        if column not in AXES:
            for v in axes.values[column]:
                trial = apply_overrides(base, [])
                _set_key(trial, column, v)
                from_dict(trial, source=f"--set {column}={v}")
    base_recipe = from_dict(base, source=source)
    base_grad = base_recipe.model.ema.grad
    force_grad = "backprop" in axes.values.get("bases_update", []) and "grad" not in axes.values and base_grad != "full"
    if force_grad:
        notes.append(
            "note: bases_update=backprop needs grad=full (no gradient would reach the bases otherwise); "
            f"the backprop cells train with grad=full, the others with grad={base_grad} (see the grad column)"
        )
    columns = list(swept)
    if force_grad:
        columns.append("grad")
    if axes.iter_mode != "none" and "train_iters" not in columns:
        columns.append("train_iters")
    columns = _ordered(columns)
    skipped = 0
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*(axes.values[c] for c in swept)):
        values: dict[str, Any] = dict(zip(swept, combo))
        if force_grad:
            values["grad"] = "full" if values.get("bases_update") == "backprop" else base_grad
        if "train_iters" in columns and "train_iters" not in values:
            values["train_iters"] = base_recipe.model.ema.iters
        head = values.get("head", base_recipe.model.head)
        if not _has_ema_unit(head):
            values = {c: (None if c in AXES and AXES[c].ema_only else v) for c, v in values.items()}
        elif (values.get("bases_update", base_recipe.model.ema.bases_update) == "backprop"
              and values.get("grad", base_grad) != "full"):
            skipped += 1
            continue
        values = {c: values[c] for c in columns}
        for seed in seeds:
            row = {**values, "seed": seed}
            name = cell_name(row)
            if name in seen:
                continue
            seen.add(name)
            data = apply_overrides(base, [])
            for column, value in values.items():
                if value is not None:
                    _set_key(data, _key_of(column), value)
            _set_key(data, "train.seed", seed)
            data["name"] = name
            cells.append(Cell(name, row, data, _eval_values(axes, values, head)))
    if skipped:
        notes.append(f"note: skipped {skipped} combination(s) of bases_update=backprop with grad other than full "
                     "(no gradient would reach the bases)")
    if not cells:
        raise UserError("the axes leave no valid cell to train")
    for cell in cells:
        from_dict(cell.recipe, source=f"ablate cell {cell.name}")
    return cells, notes


def _eval_values(axes: Axes, values: dict[str, Any], head: str) -> list[int | None]:
    if axes.iter_mode == "none" or not _has_ema_unit(head):
        return [None]
    if axes.iter_mode == "diagonal":
        return [values["train_iters"]]
    return list(axes.values["eval_iters"])


def table_columns(axes: Axes, cells: Sequence[Cell]) -> list[str]:
    """The axis columns of the results table: train T, eval T, the named axes, ``--set`` keys."""
    present = [c for c in cells[0].values if c != "seed"] if cells else []
    if axes.iter_mode != "none":
        present += ["train_iters", "eval_iters"]
    return _ordered(list(dict.fromkeys(present)))
