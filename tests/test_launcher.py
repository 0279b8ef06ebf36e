"""``emactl ablate --launcher slurm``: submitit's local executor for submit / skip / resume /
preempt, a fake ``sbatch`` on PATH for the SLURM parameters, ``--status`` and a kill -9 of the driver."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from emactl.ablate.launcher import (
    EXECUTOR_ENV, JOB_FILE, JOBS_DIR, TRAIN_FILE, CellJob, CellTask, eval_file, torchrun_command,
)
from emactl.ablate.progress import last_train_record
from emactl.cli import main
from emactl.engine.checkpoint import checkpoint_path

from test_ablate import QUIET, TINY, cli, one_line_error

pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def argv(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", "--recipe", str(recipe), "--train-iters", "1,2", "--out", str(out), "--launcher", "slurm",
            *QUIET, *extra]


def submissions(out: Path) -> int:
    """Jobs submitit was given for this sweep (one pickle each)."""
    return len(list((out / JOBS_DIR).glob("*_submitted.pkl")))


@pytest.fixture(scope="module")
def local_sweep(recipe_file, tmp_path_factory) -> Path:
    """A 2-cell sweep run as jobs of submitit's LocalExecutor."""
    out = tmp_path_factory.mktemp("slurm") / "sweep"
    mp = pytest.MonkeyPatch()
    mp.setenv(EXECUTOR_ENV, "local")
    try:
        with pytest.raises(SystemExit) as exc:
            main(argv(recipe_file, out))
        assert exc.value.code == 0
    finally:
        mp.undo()
    return out


def test_cells_run_as_submitit_jobs_and_the_table_is_built(local_sweep):
    df = pd.read_csv(local_sweep / "results.csv")
    assert sorted(df.train_iters) == [1, 2] and df["mIoU"].notna().all()
    assert submissions(local_sweep) == 2
    for cell in ("T1_seed0", "T2_seed0"):
        record = json.loads((local_sweep / "cells" / cell / JOB_FILE).read_text())
        assert record["executor"] == "local" and record["job_id"]


def test_rerun_skips_finished_cells_and_submits_nothing(local_sweep, recipe_file, monkeypatch, capsys):
    monkeypatch.setenv(EXECUTOR_ENV, "local")
    (local_sweep / "results.csv").unlink()
    code, _, err = cli(argv(recipe_file, local_sweep), capsys)
    assert code == 0, err
    assert "2 finished, 0 to run" in err and submissions(local_sweep) == 2
    assert len(pd.read_csv(local_sweep / "results.csv")) == 2
    code, out, _ = cli(["ablate", "--status", str(local_sweep)], capsys)
    assert code in (0, None) and out.strip().splitlines()[-1] == "2 done"


def test_failed_or_preempted_cell_is_resubmitted_and_resumes(local_sweep, recipe_file, monkeypatch, capsys):
    """The job of T2 ended (its process is gone) before the cell was trained: submitted again,
    it resumes from the cell's iteration-1 checkpoint instead of training afresh."""
    monkeypatch.setenv(EXECUTOR_ENV, "local")
    cell = local_sweep / "cells" / "T2_seed0"
    for path in (cell / TRAIN_FILE, checkpoint_path(cell, 2), eval_file(cell, None), eval_file(cell, 2)):
        path.unlink(missing_ok=True)
    first = checkpoint_path(cell, 1).stat().st_mtime_ns
    code, out, _ = cli(["ablate", "--status", str(local_sweep)], capsys)
    assert "T2_seed0" in out and "stopped" in out and "it 2" in out
    code, _, err = cli(argv(recipe_file, local_sweep), capsys)
    assert code == 0, err
    assert "1 finished, 1 to run" in err and submissions(local_sweep) == 3
    assert checkpoint_path(cell, 2).is_file() and checkpoint_path(cell, 1).stat().st_mtime_ns == first
    assert pd.read_csv(local_sweep / "results.csv")["mIoU"].notna().all()


def test_checkpoint_requeues_the_same_cell():
    task = CellTask("T1_seed0", "/x/cells/T1_seed0", {}, [1])
    job = CellJob(task, gpus=1)
    again = job.checkpoint()
    assert again.function is job and again.args == () and again.kwargs == {}


def test_a_cell_with_several_gpus_trains_with_torchrun(tmp_path):
    task = CellTask("T1_seed0", str(tmp_path / "cells" / "T1_seed0"), {}, [1])
    command = torchrun_command(task, 4, tmp_path / "r.yaml")
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert command[5:8] == ["-m", "emactl", "train"] and "--resume" in command
    assert command[command.index("--out") + 1] == str(tmp_path / "cells") and command[-3] == "T1_seed0"


def test_missing_submitit_is_one_line_naming_the_extra(recipe_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    line = one_line_error(*cli(argv(recipe_file, tmp_path / "s"), capsys)[::2])
    assert '.[slurm]' in line


def test_unknown_launcher_key_and_bad_values_are_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "launcher": {"partitoin": "gpu"}}))
    line = one_line_error(*cli(["ablate", "--recipe", str(recipe), "--iters", "1,2", "--no-progress"], capsys)[::2])
    assert "launcher.partitoin" in line
    for extra, needle in ((["--launcher", "pbs"], "--launcher"), (["--slurm-time", "0"], "--slurm-time"),
                          (["--status", str(tmp_path)], "--status DIR only shows a sweep")):
        line = one_line_error(*cli(["ablate", "--iters", "1,2", *extra, "--no-progress"], capsys)[::2])
        assert needle in line
    line = one_line_error(*cli(["ablate", "--status", str(tmp_path / "none")], capsys)[::2])
    assert "not an ablation sweep directory" in line


# --------------------------------------------------------------------------------------------
# A fake SLURM: sbatch records its arguments and the script, sacct answers from a file.

SBATCH = """#!/bin/sh
n=$(ls "{log}" | wc -l)
cp "$1" "{log}/call$n.sh"
echo "Submitted batch job $((1000 + n))"
"""
SACCT = """#!/bin/sh
state=$(cat "{state}")
echo "JobID|State|NodeList"
for id in 1000 1001 1002 1003; do echo "$id|$state|node1"; done
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(folder of the sbatch calls, file holding the state sacct reports)."""
    bin_dir, log, state = tmp_path / "bin", tmp_path / "sbatch_calls", tmp_path / "state"
    bin_dir.mkdir(), log.mkdir()
    state.write_text("PENDING")
    for name, text in (("sbatch", SBATCH.format(log=log)), ("sacct", SACCT.format(state=state)),
                       ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    return log, state


def test_sbatch_gets_the_slurm_parameters_and_nothing_is_submitted_twice(fake_slurm, tmp_path, capsys):
    log, state = fake_slurm
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "launcher": {"kind": "slurm", "partition": "gpu"}}))
    out = tmp_path / "sweep"
    base = ["ablate", "--recipe", str(recipe), "--train-iters", "1,2", "--out", str(out), *QUIET, "--no-wait"]
    code, _, err = cli([*base, "--slurm-gpus-per-cell", "2", "--slurm-time", "90", "--slurm-account", "lab"], capsys)
    assert code == 0, err
    scripts = sorted(log.glob("call*.sh"))
    assert len(scripts) == 2 and "2 cell(s) queued" in err
    text = scripts[0].read_text()
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=90", "--account=lab", "--requeue",
                 "--signal=USR2@120", "--job-name=emactl-T1_seed0", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text, line
    assert json.loads((out / "cells" / "T2_seed0" / JOB_FILE).read_text())["job_id"] == "1001"

    code, _, err = cli(base, capsys)  # queued: asked, not submitted again
    assert code == 0, err
    assert len(list(log.glob("call*.sh"))) == 2 and "is pending; not submitted again" in err
    code, stdout, _ = cli(["ablate", "--status", str(out)], capsys)
    assert "queued" in stdout and "job 1000" in stdout and stdout.strip().endswith("2 queued")

    state.write_text("FAILED")
    (out / "cells" / "T1_seed0" / "ablate.log").write_text("loading\nRuntimeError: CUDA out of memory\n\n")
    code, stdout, _ = cli(["ablate", "--status", str(out)], capsys)
    assert stdout.strip().endswith("2 failed")
    assert "T1_seed0  failed       RuntimeError: CUDA out of memory" in stdout
    code, _, err = cli(base, capsys)  # failed: submitted again
    assert code == 0, err
    assert len(list(log.glob("call*.sh"))) == 4
    assert json.loads((out / "cells" / "T2_seed0" / JOB_FILE).read_text())["job_id"] == "1003"


def test_kill_9_of_the_driver_while_cells_are_queued_submits_nothing_twice(fake_slurm, recipe_file, tmp_path,
                                                                          capsys):
    log, state = fake_slurm
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen([sys.executable, "-m", "emactl", *argv(recipe_file, out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = [out / "cells" / c / JOB_FILE for c in ("T1_seed0", "T2_seed0")]
    try:
        while not all(p.is_file() for p in jobs) and driver.poll() is None:
            time.sleep(0.2)
        assert driver.poll() is None, "the driver should wait for its queued jobs"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert len(list(log.glob("call*.sh"))) == 2
    code, _, err = cli([*argv(recipe_file, out), "--no-wait"], capsys)
    assert code == 0, err
    assert len(list(log.glob("call*.sh"))) == 2
    state.write_text("RUNNING")
    (out / "cells" / "T2_seed0" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iter": 1}) + "\n")
    code, stdout, _ = cli(["ablate", "--status", str(out)], capsys)
    assert stdout.strip().endswith("2 running")
    assert "T1_seed0  running      job 1000 · it 0/2" in stdout and "job 1001 · it 1/2" in stdout


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the job's process")
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGUSR2 (SLURM's warning before preemption or the time limit) in the middle of training:
    submitit calls CellJob.checkpoint() and requeues the job, which resumes the cell."""
    monkeypatch.setenv(EXECUTOR_ENV, "local")
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "iters": 300, "ckpt_every": 20}}))
    out = tmp_path / "sweep"
    base = ["ablate", "--recipe", str(recipe), "--iters", "1", "--out", str(out), "--launcher", "slurm", *QUIET]
    code, _, err = cli([*base, "--no-wait"], capsys)
    assert code == 0, err
    cell = out / "cells" / "T1_seed0"
    controller = int(json.loads((cell / JOB_FILE).read_text())["job_id"])
    while (last_train_record(cell) or {}).get("iter", 0) < 2:
        time.sleep(0.1)
    (task,) = _children(controller)
    os.kill(task, signal.SIGUSR2)
    code, _, err = cli(base, capsys)  # waits for the (requeued) job, then builds the table
    assert code == 0, err
    assert "not submitted again" in err and submissions(out) == 1
    logs = "".join(p.read_text() for p in (out / JOBS_DIR).glob("*_log.*"))
    assert "Calling checkpoint method" in logs and "Requeued job" in logs
    assert pd.read_csv(out / "results.csv")["mIoU"].notna().all()
