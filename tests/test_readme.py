"""The README's command paths work as written: its ablate example makes the sweep directory
that its visualize example reads, on a tiny recipe standing in for ``recipes/shapes.yaml``."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from emactl.cli import main

from runs import SWEEP, tiny_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = tiny_recipe(*SWEEP, "name=shapes", "data.args.val_length=2", "train.iters=1", "eval.batch_size=2")


def readme_command(prefix: str) -> list[str]:
    """The README's first ``emactl ...`` line starting with ``prefix``, comment dropped, as argv."""
    for line in README.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(prefix):
            return shlex.split(line)[1:]
    raise AssertionError(f"README has no `{prefix}` example")


def run(argv: list[str], capsys) -> tuple[str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    return out.out, out.err


def test_readme_ablate_then_visualize_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "shapes.yaml").write_text(yaml.safe_dump(TINY))

    ablate = readme_command("emactl ablate --iters 1,3,5")
    _, err = run([*ablate, "--no-progress", "--threads", "1"], capsys)
    visualize = readme_command("emactl visualize ablation")
    sweep = Path(visualize[-1])
    assert sweep.is_dir(), f"the README's visualize example reads {sweep}, which ablate did not write"

    last = err.strip().splitlines()[-1]
    written = sorted(p.relative_to(sweep) for p in sweep.rglob("*")
                     if p.is_file() and p.parts[len(sweep.parts)] != "cells" and p.name not in ("sweep.json", ".lock"))
    assert last.startswith(f"wrote {sweep}/: ")
    for path in written:  # the last line names every file the report wrote, the figure included
        stem = str(path.with_suffix(""))
        assert re.search(rf"(^|[ ,]){re.escape(stem)}(\.|$)", last.split(": ", 1)[1]), (path, last)
    assert Path("figures/ablation_eval_iters.png") in written

    before = (sweep / "figures" / "ablation_eval_iters.png").stat().st_size
    out, _ = run(visualize, capsys)
    assert out.split() == [str(sweep / "figures" / "ablation_eval_iters.png")]  # one figure, one place
    assert (sweep / "figures" / "ablation_eval_iters.png").stat().st_size == before
    assert sorted(p.name for p in (sweep / "figures").iterdir()) == ["ablation_eval_iters.png"]
