"""What each Slurm array task of a distributed ``prepare`` runs: one stage's ranks, rebuilt from
plain arguments, never from a pickle.

datatrove's :class:`~datatrove.executor.SlurmPipelineExecutor` writes the whole executor with
``dill`` to ``<logging_dir>/executor.pik`` and each array task runs ``launch_pickled_pipeline``
on it, so whoever can write the shared work directory could make every task run their code.
llmkit's rule is that nothing it loads runs code, so :class:`~llmkit.data.distributed.job.
SafeSlurmExecutor` submits ``python -m llmkit.data.distributed.launch STAGE WORK_DIR --tasks N
--tasks-per-job K --max-array-size M`` instead (Slurm keeps the script as submitted): the stage
is one of llmkit's own classes (:data:`~llmkit.data.distributed.job.STAGE_CLASSES`), its
settings come from the work directory's ``spec.json`` (JSON), and the rank from
``SLURM_ARRAY_TASK_ID`` and ``ranks_to_run.json`` (JSON) as datatrove computes it. The
``executor.pik`` datatrove still writes is never read.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from datatrove.executor import SlurmPipelineExecutor

from llmkit.errors import UserError

#: The command datatrove's sbatch script runs, replaced by :class:`SafeSlurmExecutor`.
PICKLED_LAUNCH = "launch_pickled_pipeline "


class SafeSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor whose array tasks run this module (``python -m
    llmkit.data.distributed.launch``) instead of unpickling ``executor.pik``. Its pipeline
    is one :class:`~llmkit.data.distributed.job.Stage`.

    It submits no ``merge_stats`` job after each array (datatrove does): llmkit adds up its
    own counts when it writes the output (:func:`~llmkit.data.distributed.job.assemble`) and
    never reads datatrove's ``stats.json``, and that job runs the ``merge_stats`` script
    found on the submitting shell's ``PATH`` (none when the virtual environment is not
    activated: the job then fails, command not found), doubling the jobs in the queue for
    nothing."""

    def launch_merge_stats(self) -> None:
        """Submit nothing (see the class)."""

    def get_launch_file_contents(self, sbatch_args: dict, run_script: str) -> str:
        if PICKLED_LAUNCH in run_script:
            stage = self.pipeline[0]
            argv = [sys.executable, "-m", "llmkit.data.distributed.launch", stage.name]
            argv += [stage.work_dir, "--tasks", str(self.tasks)]
            argv += ["--tasks-per-job", str(self.tasks_per_job)]
            argv += ["--max-array-size", str(self.max_array_size)]
            command = " ".join(shlex.quote(x) for x in argv)
            run_script = run_script[: run_script.index(PICKLED_LAUNCH)] + command
        return super().get_launch_file_contents(sbatch_args, run_script)


class SbatchFailed(UserError):
    """``sbatch`` could not be run, or refused the submission (its own reason, one line)."""


def sbatch(launch_file_contents: str, job_id_retriever: Callable[[str], str], *args: str) -> str:
    """Submit a launch script with ``sbatch ARGS SCRIPT``, as datatrove's
    :func:`~datatrove.executor.slurm.launch_slurm_job` does, but with ``sbatch``'s stderr
    captured (and written on to ``sys.stderr``, the job's console log): a failure is one
    line with sbatch's own reason, not a ``CalledProcessError``. Returns the job id
    (``job_id_retriever`` of sbatch's stdout).

    Raises:
        SbatchFailed: sbatch is not found or cannot run, or exits non-zero (the last line of
            its stderr).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".slurm") as f:
        f.write(launch_file_contents)
        f.flush()
        try:
            done = subprocess.run(["sbatch", *args, f.name], capture_output=True, text=True)
        except OSError as err:
            raise SbatchFailed(
                f"sbatch failed: cannot run it ({err.strerror})",
                "submit from a Slurm login node, where sbatch and sinfo are on PATH",
            ) from None
    if done.stderr:
        sys.stderr.write(done.stderr)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}, nothing on stderr"
        raise SbatchFailed(f"sbatch failed: {why}", "check that Slurm is reachable (sinfo)")
    return job_id_retriever(done.stdout)


@contextmanager
def submitting_with_sbatch() -> Iterator[None]:
    """Within the block, datatrove's Slurm executors submit with :func:`sbatch` (its module's
    ``launch_slurm_job``, which :meth:`SlurmPipelineExecutor.launch_job` calls by name, is
    swapped for the block only)."""
    from datatrove.executor import slurm

    saved = slurm.launch_slurm_job
    slurm.launch_slurm_job = sbatch
    try:
        yield
    finally:
        slurm.launch_slurm_job = saved


def slurm_tag(work_url: str) -> str:
    """The ``--comment`` of every job a work directory's job submits (``llmkit-`` and 12 hex
    digits of the SHA-256 of its URL): :func:`queued_jobs` finds them by it."""
    return "llmkit-" + hashlib.sha256(work_url.rstrip("/").encode()).hexdigest()[:12]


def queued_jobs(tag: str) -> list[str]:
    """Ids of this user's Slurm jobs (pending or running) whose comment is ``tag``, from
    ``squeue``; empty when ``squeue`` is missing or fails (nothing can be told)."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %k"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    rows = [line.split(None, 1) for line in done.stdout.splitlines()]
    return [r[0] for r in rows if len(r) == 2 and r[1].strip() == tag]


def main(argv: Sequence[str] | None = None) -> int:
    """Run this array task's ranks of one stage; returns the exit status."""
    from llmkit.data.distributed.job import STAGE_CLASSES, Work

    parser = argparse.ArgumentParser("python -m llmkit.data.distributed.launch")
    parser.add_argument("stage", choices=sorted(STAGE_CLASSES))
    parser.add_argument("work_dir")
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--tasks-per-job", type=int, default=1)
    parser.add_argument("--max-array-size", type=int, default=1001)
    args = parser.parse_args(argv)
    work = Work(args.work_dir)
    executor = SlurmPipelineExecutor(
        [STAGE_CLASSES[args.stage](args.work_dir)],
        tasks=args.tasks,
        time="0",  # resources only matter when submitting
        partition="",
        tasks_per_job=args.tasks_per_job,
        max_array_size=args.max_array_size,
        logging_dir=work.url.rstrip("/") + f"/logs/{args.stage}",
        requeue_signals=None,
    )
    executor.run()  # inside the array task: runs its ranks (SLURM_ARRAY_TASK_ID)
    return 0


if __name__ == "__main__":
    sys.exit(main())
