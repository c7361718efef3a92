"""Whether torch and Ray have byte code beside them, said in one warning line where they do not.

A Ray job starts a dozen Python processes (Ray Train's controller and workers, Ray Data's actors and tasks,
the job supervisor), most of which import Ray and torch. Without cached byte code (pip --no-compile, then
PYTHONDONTWRITEBYTECODE, which many images set, or a read-only install) each of them compiles both from
source again: from `ray job submit` to the first step 54 s against 29 s on 2 cores (benchmarks/README.md,
"From `ray job submit` to the first logged step").
"""

from __future__ import annotations

import importlib.util
import os


def bytecode_warning(modules=("torch", "ray")) -> str | None:
    """The warning line when any of `modules` has no byte code (found, never imported), else None."""
    missing, where = [], []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        if not os.path.exists(importlib.util.cache_from_source(spec.origin)):
            missing.append(name)
            # The folder that holds the package or module (site-packages), for the command to compile it.
            folder = os.path.dirname(spec.origin)
            folder = os.path.dirname(folder) if spec.submodule_search_locations else folder
            where += [folder] if folder not in where else []
    if not missing:
        return None
    one = len(missing) == 1
    return (f"warning: {' and '.join(missing)} {'is' if one else 'are'} not byte-compiled in this Python, so every "
            f"Ray process compiles {'it' if one else 'them'} again (about twice the start-up); compile once with: "
            f"python -m compileall -q -j 0 {' '.join(where)}")


def warn_if_not_compiled(file=None) -> None:
    """Print bytecode_warning's line, if any, to `file` (sys.stdout as it is at the call)."""
    line = bytecode_warning()
    if line:
        print(line, file=file, flush=True)
