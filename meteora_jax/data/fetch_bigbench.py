"""Downloads BIG-bench JSON task files from the PyPI sdist bigbench==1.0.0 (the package is not installed).

python -m meteora_jax.data.fetch_bigbench --out DIR [--tasks t1 t2 ...] [--archive SDIST] [--overwrite]

Writes DIR/<task>/**/task.json for each task (default: the 20 MeteoRA tasks of BIGBENCH_TASKS),
taken from bigbench/benchmark_tasks/<task>/ in the archive; every task is written to a temporary
directory inside DIR and renamed into place. --archive uses a local bigbench-1.0.0.tar.gz instead of
downloading it (pip download, about 360 MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from meteora_jax.data.bigbench import BIGBENCH_TASKS

BIGBENCH_SDIST = "bigbench==1.0.0"
_TASKS_ROOT = ("bigbench", "benchmark_tasks")


def download_sdist(dest: str | os.PathLike, requirement: str = BIGBENCH_SDIST) -> Path:
    """pip-downloads the sdist of `requirement` (no dependencies, no install) into dest; its path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download of {requirement} failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stderr.strip()}"
        )
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one .tar.gz from pip download in {dest}, found {[a.name for a in archives]}")
    return archives[0]


def _task_member(name: str) -> tuple[str, PurePosixPath] | None:
    """(task, path inside the task) of an archive member .../bigbench/benchmark_tasks/<task>/.../task.json."""
    parts = PurePosixPath(name).parts
    for k in range(len(parts) - 3):
        if parts[k : k + 2] == _TASKS_ROOT:
            rest = parts[k + 2 :]
            if rest[-1] == "task.json" and not any(p in ("", ".", "..") for p in rest):
                return rest[0], PurePosixPath(*rest[1:])
            return None
    return None


def extract_tasks(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    tasks: Sequence[str] = BIGBENCH_TASKS,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Extracts the task.json files (subtasks included) of `tasks` from a bigbench sdist into out/<task>/.

    No task directory is written unless every task is in the archive (ValueError naming the missing
    ones) and, without overwrite, no out/<task> exists yet (FileExistsError). Returns the task directories.
    """
    out = Path(out)
    tasks = list(dict.fromkeys(tasks))
    if not overwrite:
        existing = [t for t in tasks if (out / t).exists()]
        if existing:
            raise FileExistsError(f"{out}: task directories {existing} already exist; pass overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out))
    try:
        found: set[str] = set()
        # One forward pass: extracting a member behind the read position would re-read a gzip stream.
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                where = _task_member(member.name) if member.isfile() else None
                if where is None or where[0] not in tasks:
                    continue
                target = staging / where[0] / where[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found.add(where[0])
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ValueError(f"{archive}: no bigbench/benchmark_tasks/<task>/**/task.json for tasks {missing}")
        for task in tasks:
            final = out / task
            if final.exists():
                final.rename(staging / f".old-{task}")
            (staging / task).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / t for t in tasks]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meteora_jax.data.fetch_bigbench", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write <task>/**/task.json into")
    p.add_argument(
        "--tasks", nargs="+", default=list(BIGBENCH_TASKS), help="task names (default: the 20 MeteoRA tasks)"
    )
    p.add_argument("--archive", help="a local bigbench-1.0.0.tar.gz to read instead of downloading")
    p.add_argument("--overwrite", action="store_true", help="replace existing task directories")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bigbench-sdist-") as tmp:
            archive = args.archive or download_sdist(tmp)
            written = extract_tasks(archive, args.out, args.tasks, overwrite=args.overwrite)
    except (RuntimeError, ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} tasks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
