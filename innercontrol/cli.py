"""Entry points' error handling: a configuration or input error prints one line and exits non-zero, no traceback.

    if __name__ == "__main__":
        run_cli(main)

Real bugs (any other exception) keep their traceback; INNERCONTROL_TRACEBACK=1 shows it for every error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

# The project's error types for what the user gave (config values, files, folders, models, data) and for runs that
# stop on purpose with a message saying what to change. Matched by name so this module imports nothing heavy; the
# module check keeps a library's exception of the same name out.
USER_ERRORS = {
    "ConfigError": 2,  # a configuration error is a usage error, the exit code argparse gives for a bad flag
    "ProbeLoadError": 1,
    "CheckpointError": 1,
    "HubUnreachableError": 1,
    "ModelFolderError": 1,
    "DataError": 1,
    "NonFiniteLossError": 1,
    "CollapsedProbeError": 1,
    "FailedProbeError": 1,
    "OutputFolderError": 1,
}


def show_traceback() -> bool:
    return os.environ.get("INNERCONTROL_TRACEBACK", "0").lower() in ("1", "true", "yes", "on")


def user_error_code(err: BaseException) -> int | None:
    """The exit code for a user-facing error, None for an unexpected one (a bug: it keeps its traceback)."""
    for cls in type(err).__mro__:
        ours = cls.__module__.startswith("innercontrol") or cls.__module__ == "__main__"
        if ours and cls.__name__ in USER_ERRORS:
            return USER_ERRORS[cls.__name__]
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return 1  # a path given as input or output; the message names it
    if isinstance(err, subprocess.CalledProcessError):  # a stage of the demo: its own error is printed above it
        return err.returncode if err.returncode > 0 else 1
    return None


def program_name() -> str:
    """`python -m innercontrol.train` for a module run with -m, else the script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "innercontrol"


def run_cli(main: Callable[[], object]) -> None:
    """Run an entry point's main(); a user error ends the process with one line on stderr and a non-zero code."""
    try:
        main()
    except Exception as err:
        code = user_error_code(err)
        if code is None or show_traceback():
            raise
        if isinstance(err, subprocess.CalledProcessError):
            message = f"`{' '.join(map(str, err.cmd))}` exited with {err.returncode} (its error is printed above)"
        else:
            message = str(err) or type(err).__name__
        print(f"{program_name()}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)
