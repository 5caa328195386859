"""bench/gpu_session.sh, the GPU runbook, in its dry-run mode: the plan, the deadline, and the second
call that picks up what the first did not reach (the commands themselves need the GPU machine)."""

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "pytest-gpu", "kernels-attention", "kernels-adaln", "kernels-rope", "bench-256", "bench-512",
         "dit-diffusers", "bench-demo", "profile-512"]


@pytest.fixture
def session(tmp_path):
    """A copy of the script in a scratch repository, so its logs/ and results stay out of ours."""
    (tmp_path / "repo" / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_session.sh", tmp_path / "repo" / "bench")
    out, state = tmp_path / "out", tmp_path / "state"

    def call(*steps, **env):
        env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "OUT": str(out), "GPU_SESSION_STATE": str(state),
               **{k: str(v) for k, v in env.items()}}
        return subprocess.run(["bash", "bench/gpu_session.sh", *steps], cwd=tmp_path / "repo", env=env,
                              capture_output=True, text=True, timeout=120)

    def summary():
        rows = (tmp_path / "repo" / "logs" / "summary.tsv").read_text().splitlines()[1:]
        return [row.split("\t")[:3] for row in rows if "warm-up" not in row]

    return call, summary, out


def test_dry_run_plans_every_step_in_order_and_packs(session):
    call, summary, out = session
    proc = call()
    assert proc.returncode == 0, proc.stderr
    assert summary() == [["1", step, "0"] for step in STEPS]
    assert proc.stdout.count("warm-up ") >= 10  # the caches are filled before the timed steps
    with tarfile.open(out / "gpu_session-1.tgz") as tar:
        assert "logs/summary.tsv" in tar.getnames()


def test_deadline_leaves_steps_to_a_second_call(session):
    call, summary, out = session
    first = call(DEADLINE=60, DRY_STEP_S=3)
    assert first.returncode == 0, first.stderr
    done = [row for row in summary() if row[2] == "0"]
    assert [row[1] for row in done] == STEPS[:len(done)] and 0 < len(done) < len(STEPS)
    assert "not-started" in {row[2] for row in summary()}
    second = call(DEADLINE=600)
    assert second.returncode == 0, second.stderr
    assert [row[1] for row in summary() if row[0] == "2"] == STEPS[len(done):]  # only what was left
    assert (out / "gpu_session-2.tgz").is_file()


def test_unknown_step_is_refused(session):
    call, _, _ = session
    proc = call("bench-1024")
    assert proc.returncode == 2 and "unknown step bench-1024" in proc.stdout
