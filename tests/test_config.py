"""Recipes: loading, dotted overrides, validation errors, and the CLI's error mapping."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emactl.config import (
    EMAConfig,
    Recipe,
    apply_overrides,
    choices,
    dump_yaml,
    from_dict,
    load_recipe,
    parse_override,
    to_dict,
)
from emactl.errors import UserError
from emactl.nn.choices import BASES_UPDATES, GRAD_MODES, NORMS

from cli_run import cli, one_line_error

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# Shipped recipes


def test_recipes_exist():
    assert RECIPES, "no recipes/*.yaml found"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_round_trips(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    raw = yaml.safe_load(path.read_text()) or {}
    # the values written in the file are the values in the recipe
    for section in ("data", "model", "train", "eval"):
        for key, value in (raw.get(section) or {}).items():
            if isinstance(value, dict):
                continue
            got = getattr(getattr(r, section), key)
            if isinstance(got, float) and isinstance(value, str):  # `1e-3` is a YAML string
                value = float(value)
            assert got == value, f"{section}.{key}"
    # the resolved config saved beside results loads back to the same recipe
    assert from_dict(yaml.safe_load(dump_yaml(r))) == r
    assert from_dict(to_dict(r)) == r


def test_paper_recipes_build_the_sources_networks():
    """voc/voc_aug build the original code's network, cityscapes_mmseg mmseg's 769x769 one."""
    from emactl.importer import mmseg_model, original_model

    for name in ("voc", "voc_aug"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert dataclasses.replace(recipe.model, pretrained=None) == original_model(101), name
        assert recipe.eval.pad_multiple == 8
    recipe = load_recipe(ROOT / "recipes" / "cityscapes_mmseg.yaml")
    assert dataclasses.replace(recipe.model, pretrained=None) == mmseg_model(101, align_corners=True)
    assert (recipe.eval.mode, recipe.eval.crop_size, recipe.eval.stride) == ("slide", 769, 513)


def test_defaults_match_the_paper():
    r = load_recipe(None)
    e = r.model.ema
    assert (e.bases, e.iters, e.momentum, e.norm, e.renorm) == (64, 3, 0.9, "l2", True)
    assert e == EMAConfig()
    assert r.train.lr == 9e-3 and r.train.batch_size == 16


# ---------------------------------------------------------------------------------------------
# Dotted overrides


def test_override_int():
    r = load_recipe(RECIPES[0], ["model.ema.iters=5"])
    assert r.model.ema.iters == 5 and type(r.model.ema.iters) is int
    assert load_recipe(RECIPES[0]).model.ema.iters == 3  # the file itself is unchanged


def test_override_values_are_yaml_typed():
    r = load_recipe(
        None,
        [
            "eval.scales=[0.5,1.0,1.5]",
            "data.mean=[0.5, 0.5, 0.5]",
            "data.class_names=[a, b]",
            "data.num_classes=2",
            "model.ema.eval_iters=null",
            "model.ema.renorm=false",
            "model.ema.temperature=2",
            "data.root=/data/a=b",
            "name=my run",
        ],
    )
    assert r.eval.scales == [0.5, 1.0, 1.5]
    assert r.data.mean == [0.5, 0.5, 0.5]
    assert r.data.class_names == ["a", "b"]
    assert r.model.ema.eval_iters is None
    assert r.model.ema.renorm is False
    assert r.model.ema.temperature == 2.0 and isinstance(r.model.ema.temperature, float)
    assert r.data.root == "/data/a=b"  # only the first '=' splits
    assert r.name == "my run"


def test_override_exponent_float():
    # PyYAML reads `1e-3` (no dot) as a string; a float field must still accept it
    r = load_recipe(None, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert r.train.lr == pytest.approx(1e-3) and r.train.weight_decay == pytest.approx(5e-4)


def test_override_creates_nested_sections():
    data = {"name": "x"}
    out = apply_overrides(data, ["model.ema.norm=layernorm", "a.b.c=1"])
    assert out == {"name": "x", "model": {"ema": {"norm": "layernorm"}}, "a": {"b": {"c": 1}}}
    assert data == {"name": "x"}  # the input is not modified
    r = load_recipe(None, ["model.ema.norm=layernorm", "model.ema.grad=full"])
    assert (r.model.ema.norm, r.model.ema.grad) == ("layernorm", "full")
    assert r.model.ema.iters == 3  # sibling defaults survive


def test_override_later_wins():
    assert load_recipe(None, ["train.iters=5", "train.iters=7"]).train.iters == 7


def test_parse_override():
    assert parse_override("model.ema.iters=5") == (["model", "ema", "iters"], 5)
    assert parse_override("data.root=") == (["data", "root"], "")


@pytest.mark.parametrize("item", ["foo", "model.ema.iters", "=3"])
def test_override_bad_form(item):
    with pytest.raises(UserError, match="--set"):
        load_recipe(None, [item])


def test_override_into_a_value_is_an_error(tmp_path):
    p = _write(tmp_path, "name: run\n")
    with pytest.raises(UserError, match="'name' is not a section"):
        load_recipe(p, ["name.x=1"])


def test_ema_choices_come_from_nn_choices():
    """One definition: the recipe's Literal fields are built from the tuples the unit checks."""
    assert choices(EMAConfig, "norm") == NORMS
    assert choices(EMAConfig, "grad") == GRAD_MODES
    assert choices(EMAConfig, "bases_update") == BASES_UPDATES


def test_removed_cuda_graph_key_is_a_one_line_exit_2(tmp_path, capsys):
    """model.ema.cuda_graph went with nn/cudagraph.py (#15): a recipe or --set that still sets it
    gets the ordinary unknown-key error."""
    recipe = _write(tmp_path, "model:\n  ema:\n    cuda_graph: true\n")
    for argv in (["train", str(recipe)], ["train", str(ROOT / "recipes" / "shapes.yaml"), "--set", "model.ema.cuda_graph=true"]):
        code, _, err = cli(argv, capsys)
        assert "unknown key 'model.ema.cuda_graph'" in one_line_error(code, err)


def test_override_unknown_key_is_an_error():
    with pytest.raises(UserError, match=r"model\.ema\.itres"):
        load_recipe(None, ["model.ema.itres=5"])


# ---------------------------------------------------------------------------------------------
# Bad recipes: UserError naming the dotted key


@pytest.mark.parametrize(
    "text, needles",
    [
        ("model:\n  ema:\n    itres: 3\n", ["unknown key 'model.ema.itres'", "iters"]),
        ("bogus: 1\n", ["unknown key 'bogus'"]),
        ("train:\n  iters: abc\n", ["train.iters", "'abc'", "integer"]),
        ("train:\n  iters: 2.5\n", ["train.iters", "integer"]),
        ("train:\n  iters: true\n", ["train.iters", "integer"]),
        ("train:\n  lr: fast\n", ["train.lr", "number"]),
        ("data:\n  flip: 1\n", ["data.flip", "true or false"]),
        ("eval:\n  scales: [1.0, x]\n", ["eval.scales[1]"]),
        ("model:\n  ema: 3\n", ["model.ema", "mapping"]),
        ("model:\n  ema:\n    norm: l3\n", ["model.ema.norm", "'l3'", "l2", "layernorm", "none"]),
        ("model:\n  ema:\n    grad: some\n", ["model.ema.grad", "none", "last", "full"]),
        ("model:\n  ema:\n    cuda_graph: true\n", ["unknown key 'model.ema.cuda_graph'"]),  # removed in #15
        ("model:\n  output_stride: 4\n", ["model.output_stride", "8", "16", "32"]),
        ("model:\n  ema:\n    iters: 0\n", ["model.ema.iters", "> 0"]),
        ("model:\n  ema:\n    bases: -4\n", ["model.ema.bases", "> 0"]),
        ("model:\n  ema:\n    temperature: 0.0\n", ["model.ema.temperature", "> 0"]),
        ("model:\n  ema:\n    eval_iters: 0\n", ["model.ema.eval_iters", "> 0"]),
        ("train:\n  lr: -0.1\n", ["train.lr", "> 0"]),
        ("train:\n  batch_size: 0\n", ["train.batch_size", "> 0"]),
        ("model:\n  ema:\n    momentum: 1.5\n", ["model.ema.momentum"]),
        (
            "model:\n  ema:\n    bases_update: backprop\n    grad: last\n",
            ["model.ema.bases_update=backprop", "model.ema.grad=full"],
        ),
        ("train:\n  batch_size: 16\n  accum_steps: 3\n", ["train.batch_size", "train.accum_steps"]),
        ("data:\n  num_classes: 3\n  class_names: [a, b]\n", ["data.class_names"]),
        ("eval:\n  scales: []\n", ["eval.scales"]),
    ],
)
def test_bad_recipe(tmp_path, text, needles):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(p))  # names the file
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_backprop_with_full_grad_is_fine():
    r = load_recipe(None, ["model.ema.bases_update=backprop", "model.ema.grad=full"])
    assert r.model.ema.bases_update == "backprop"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="invalid YAML at line 2"):
        load_recipe(_write(tmp_path, "name: a\nmodel: ema: 3\n"))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
@pytest.mark.parametrize("overrides", [[], ["train.iters=5"]])
def test_recipe_must_be_a_mapping(tmp_path, text, overrides):
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_recipe(_write(tmp_path, text), overrides)


def test_empty_file_gives_defaults(tmp_path):
    assert load_recipe(_write(tmp_path, "")) == Recipe()


# ---------------------------------------------------------------------------------------------
# CLI error mapping


def test_one_line_keeps_last_line_of_worker_traceback():
    from emactl.cli import _one_line

    msg = (
        "Caught UserError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/x/torch/utils/data/_utils/worker.py", line 349, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        '  File "/x/emactl/data/voc.py", line 12, in __getitem__\n'
        '    raise UserError("voc: missing JPEGImages/a.jpg")\n'
        "emactl.errors.UserError: voc: missing JPEGImages/a.jpg\n"
    )
    assert _one_line(msg) == "voc: missing JPEGImages/a.jpg"
    assert _one_line("  recipe: train.iters: bad  ") == "recipe: train.iters: bad"


def test_one_line_on_a_reraised_worker_error():
    # what a DataLoader worker does with an exception: wrap it, then re-raise in the parent
    from torch._utils import ExceptionWrapper

    from emactl.cli import _one_line

    try:
        raise UserError("shapes: broken sample 0")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)  # the raw message is multi-line
    assert _one_line(str(info.value)) == "shapes: broken sample 0"


def test_one_line_drops_the_qualified_class_of_a_reraised_data_file_error():
    from torch._utils import ExceptionWrapper

    from emactl.cli import _one_line
    from emactl.data.readers import DataFileError

    try:
        raise DataFileError("a.jpg: cannot read image (truncated)", "a.jpg")
    except DataFileError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataFileError) as info:
        wrapped.reraise()
    assert _one_line(str(info.value)) == "a.jpg: cannot read image (truncated)"


def test_main_maps_user_error_to_exit_2(tmp_path, monkeypatch, capsys):
    from emactl import cli

    monkeypatch.setattr(cli.app, "registered_commands", list(cli.app.registered_commands))

    @cli.app.command("zz-load")
    def _load(recipe: str) -> None:
        load_recipe(recipe)

    @cli.app.command("zz-noop")  # two commands, so Typer keeps subcommand dispatch
    def _noop() -> None:
        pass

    bad = _write(tmp_path, "model:\n  ema:\n    itres: 3\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["zz-load", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "model.ema.itres" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as info:
        cli.main(["zz-load", str(RECIPES[0])])
    assert info.value.code == 0


def test_help_exits_zero():
    proc = subprocess.run(
        [sys.executable, "-m", "emactl", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "emactl" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Values and files that used to pass silently or crash (issue 13, items 8, 11, 12)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=.nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("data.scale_max=.inf", "data.scale_max"),
        ("train.val_every=-1", "train.val_every"),
        ("data.workers=-1", "data.workers"),
        ("name=..", "name"),
        ("name=.", "name"),
    ],
)
def test_bad_values_are_refused(tmp_path, override, needle):
    with pytest.raises(UserError, match=needle) as info:
        load_recipe(_write(tmp_path, "name: a\n"), [override])
    assert "\n" not in str(info.value)


def test_duplicate_key_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.1\n  iters: 5\n  lr: 0.2\n")
    with pytest.raises(UserError, match=r"key 'lr' appears twice .*line 4"):
        load_recipe(path)
    assert load_recipe(_write(tmp_path, "train: {lr: 0.1}\nmodel: {dropout: 0.2}\n")).train.lr == 0.1


def test_non_utf8_recipe_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: a\ntrain: {lr: 0.1}  # caf\xe9\n")
    with pytest.raises(UserError, match=r"not UTF-8 text .*line 2"):
        load_recipe(path)


def test_directory_recipe_is_not_reported_missing(tmp_path):
    with pytest.raises(UserError, match="is a directory") as info:
        load_recipe(tmp_path)
    assert "not found" not in str(info.value)


@pytest.mark.parametrize(
    "override, needle",
    [("train.lr=abc", "expected a number"), ("train.lr=-1", "must be > 0"), ("train.bogus=1", "unknown key")],
)
def test_bad_set_value_blames_the_set_item_not_the_file(tmp_path, override, needle):
    path = _write(tmp_path, "name: a\n")
    with pytest.raises(UserError, match=needle) as info:
        load_recipe(path, [override])
    assert str(info.value).startswith(f"--set {override}: ")
    assert str(path) not in str(info.value)
    # a bad value in the file itself is still the file's
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: train.lr"):
        load_recipe(_write(tmp_path, "train: {lr: abc}\n"), ["train.iters=5"])


def test_a_bad_set_key_is_blamed_on_set_and_a_bad_file_key_on_the_file(tmp_path):
    from emactl.config import load_recipe
    from emactl.errors import UserError

    good = tmp_path / "good.yaml"
    good.write_text("name: x\ntrain: {lr: 0.1}\n")
    with pytest.raises(UserError, match=r"^--set train\.bogus=1: unknown key 'train\.bogus'"):
        load_recipe(good, ["train.lr=0.2", "train.bogus=1"])
    with pytest.raises(UserError, match=r"^--set model\.ema\.iters=abc: model\.ema\.iters: got 'abc'"):
        load_recipe(good, ["model.ema.iters=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {bogus: 1}\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}: unknown key 'train\.bogus'"):
        load_recipe(bad, ["train.lr=0.2"])
    assert load_recipe(good, ["train.lr=0.3"]).train.lr == 0.3
