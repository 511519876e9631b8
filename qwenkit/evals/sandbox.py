"""Running untrusted Python (a model's HumanEval completions) so that it cannot harm the machine.

Each program runs in its own process, in a fresh temporary directory (never the caller's), stdin
closed, with limits on CPU time, memory, file size and processes, and is killed at its wall-clock
timeout together with everything it started:
- where `unshare` works (Linux, as root or with user namespaces), in new PID and network namespaces:
  no network at all, and killing the namespace's first process kills every process it forked, even
  ones that left its process group;
- as root, the program runs as the unprivileged user `nobody` (uid 65534, with this Python or, where
  nobody cannot reach it, the system's python3), so it can write nowhere but its directory and signal
  none of the caller's processes, and the process limit counts only its own processes;
- otherwise it runs as the caller with HOME pointed at its directory, in its own session, the
  process group killed at the end; `isolation()` says what applied, and the results record it.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0        # wall clock, for the whole program
    memory_bytes: int = 2 << 30    # address space
    file_bytes: int = 16 << 20     # largest file it may write
    processes: int = 64            # processes of its user (root: of `nobody`)


@dataclass
class Outcome:
    passed: bool
    status: str   # "passed", "failed" (a non-zero exit: an assertion, an exception), "timeout"
    detail: str   # the end of stderr, or why it was stopped
    stdout: str = ""  # its start, when run_program was asked to keep it
    stderr: str = ""  # its end, whatever the status


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` command that gives a program new PID and network namespaces here, or () where none works."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return ()
    base = (unshare, "--net", "--pid", "--fork", "--kill-child")
    for prefix in (base, (unshare, "--user", "--map-root-user", *base[1:])):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


def isolation() -> str:
    """How programs are isolated on this machine, for the results."""
    parts = ["own process group", "resource limits", "temporary directory"]
    if _unshare_prefix():
        parts.insert(0, "PID and network namespaces (no network)")
    else:
        parts.append("network NOT isolated (unshare unavailable)")
    if _as_nobody():
        parts.append("runs as nobody")
    elif os.geteuid() == 0:
        parts.append("runs as root (no Python here that the user nobody can run)")
    return ", ".join(parts)


def _as_nobody() -> bool:
    return os.geteuid() == 0 and _python_for_nobody() is not None


# Run inside the namespaces, before the program: its limits, then (as root) the user nobody, then the program.
# A bootstrap rather than a preexec_fn, so that `unshare` itself still runs as the caller.
BOOTSTRAP = """
import os, resource, sys
python, program, (cpu, memory, size, processes, nobody) = sys.argv[1], sys.argv[2], map(int, sys.argv[3:])
for what, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, size),
                    (resource.RLIMIT_NPROC, processes), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(what, (value, value))
if nobody:
    os.setgroups([])
    os.setgid(nobody)
    os.setuid(nobody)
os.execv(python, [python, "-I", program])
"""


@functools.cache
def _python_for_nobody() -> str | None:
    """A Python that the user nobody can run (this one's, else the system's), or None."""
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = [sys.executable, "-I", "-c", "import os, sys; os.setgid(65534); os.setuid(65534); "
                 "os.execv(sys.argv[1], [sys.argv[1], '-I', '-c', 'import json'])", python]
        try:
            if os.path.exists(python) and subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                return python
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def run_program(source: str, limits: Limits = Limits(), stdout_chars: int = 0) -> Outcome:
    """Run the Python program `source` under the module's isolation; passed when it exits 0 in time.
    `stdout_chars` > 0 keeps the start of its stdout, written to a file in its directory so that the
    file-size limit bounds it (a pipe would not)."""
    as_nobody = _as_nobody()
    python = _python_for_nobody() if as_nobody else sys.executable
    with tempfile.TemporaryDirectory(prefix="qwenkit-sandbox-") as tmp:
        work = Path(tmp)
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        if as_nobody:
            os.chown(work, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        # -I: no user site-packages, no PYTHON* variables, the script's folder not on sys.path first.
        bootstrap = [sys.executable, "-I", "-c", BOOTSTRAP, python, str(program), str(int(limits.timeout_s) + 1),
                     str(limits.memory_bytes), str(limits.file_bytes), str(limits.processes),
                     str(NOBODY if as_nobody else 0)]
        output = (work / "stdout").open("w+b") if stdout_chars > 0 else subprocess.DEVNULL
        process = subprocess.Popen([*_unshare_prefix(), *bootstrap], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            stderr = None
        finally:
            _kill(process)
        kept = ""
        if stdout_chars > 0:
            output.seek(0)
            kept = output.read(4 * stdout_chars).decode("utf-8", "replace")[:stdout_chars]
            output.close()
        if stderr is None:
            return Outcome(False, "timeout", f"killed after {limits.timeout_s:g} s", kept)
        text = stderr.decode("utf-8", "replace")[-2000:]
        if process.returncode == 0:
            return Outcome(True, "passed", "", kept, text)
        return Outcome(False, "failed", text or f"exit status {process.returncode}", kept, text)


def _kill(process: subprocess.Popen) -> None:
    """Kill the program's process group (with the namespaces: every process it started) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.kill()
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pass
