"""Where work runs (``cluster.runtime``): the allocator settings reach every earmark process and
the workers of the Ray it starts, and a user's own settings win."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.runtime import ALLOCATOR_ENV, allocator_env

ROOT = Path(__file__).resolve().parents[1]
SHOW = f"import os; print(*(os.environ.get(k) for k in {list(ALLOCATOR_ENV)!r}))"


def _bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV and k != "EARMARK_MALLOC"}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def _run(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_allocator_settings_are_the_users_own_where_set() -> None:
    assert allocator_env({}) == ALLOCATOR_ENV
    assert allocator_env({"MALLOC_TRIM_THRESHOLD_": "0"}) == {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert allocator_env({"EARMARK_MALLOC": "system"}) == {}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, " ".join(ALLOCATOR_ENV.values())),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "65536 None None"),  # the user's choice, nothing added
        ({"EARMARK_MALLOC": "system"}, "None None None"),
    ],
)
def test_an_entry_point_restarts_itself_with_the_allocator_settings(extra: dict[str, str], expected: str) -> None:
    code = f"from cluster.runtime import restart_with_allocator_env; restart_with_allocator_env(); {SHOW}"
    assert _run(code, _bare_env(**extra)) == expected


def test_the_earmark_command_runs_with_the_allocator_settings(tmp_path: Path) -> None:
    # `python -m jobs` is the `earmark` executable; an error path is enough to see its environment
    env = _bare_env()
    code = (
        "import sys, runpy; sys.argv = ['earmark', 'models', 'list', '--registry', sys.argv[1]];"
        "import atexit; atexit.register(lambda: print(__import__('os').environ.get('MALLOC_TRIM_THRESHOLD_')));"
        "runpy.run_module('jobs', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "registry")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"], done.stderr[-2000:]


def test_embedded_ray_workers_inherit_the_allocator_settings() -> None:
    code = (
        "import os, ray; from cluster.runtime import connect; connect(num_cpus=1);"
        f"show = ray.remote(lambda: [os.environ.get(k) for k in {list(ALLOCATOR_ENV)!r}]);"
        "print(*ray.get(show.remote())); ray.shutdown()"
    )
    assert _run(code, _bare_env(RAY_ADDRESS="")) == " ".join(ALLOCATOR_ENV.values())


_FILTER_CHILD = r"""
import os, sys
from cluster.runtime import filtered_native_stderr
with filtered_native_stderr():
    print("tty" if os.isatty(2) else "pipe", flush=True)  # what a progress bar would see
    os.write(2, b"keep 1\n")
    os.write(2, b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' has constructor "
                b"arguments in the object store and max_restarts > 0. If the arguments ...\n")
    os.write(2, b"bar 10%\rbar 20%\r")
    sys.stderr.write("keep 2 (Python's sys.stderr)\n")
os.write(2, b"after\n")
"""


@pytest.mark.parametrize("terminal", [False, True])
def test_rays_harmless_native_line_is_filtered_and_everything_else_passes(terminal: bool) -> None:
    import pty
    import tty

    if terminal:
        master, slave = pty.openpty()
        tty.setraw(slave)
        proc = subprocess.Popen([sys.executable, "-c", _FILTER_CHILD], stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        stdout, _ = proc.communicate(timeout=60)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child's end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        stderr = b"".join(chunks)
    else:
        done = subprocess.run([sys.executable, "-c", _FILTER_CHILD], capture_output=True, timeout=60)
        stdout, stderr = done.stdout, done.stderr
    assert stdout.decode().strip() == ("tty" if terminal else "pipe")
    assert stderr == b"keep 1\nbar 10%\rbar 20%\rkeep 2 (Python's sys.stderr)\nafter\n"
