"""The extraction child: ``python -m qwen_gateway.documents.worker PATH CAPS_JSON``.

It caps itself first (address space, CPU seconds, file writes, open files, no core dumps), then parses.
Answer on stdout: one JSON line ``{"pages": N|null}`` and the text (UTF-8); exit status 0. A refusal is
exit status :data:`REFUSED` with the reason code on stderr; anything a parser raises on hostile bytes is
reason ``corrupt``; running out of memory is ``limits``. The parent treats a kill (CPU limit, its own
deadline) as ``limits`` too.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

REFUSED = 3


def _cap_self(memory_bytes: int, cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # SIGXCPU at the soft limit ends the process (the parent reports it as a limit refusal).
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    # Nothing here writes a file (stdout and stderr are pipes, which this does not cover).
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def main(argv: list[str]) -> int:
    path, raw_caps = Path(argv[0]), json.loads(argv[1])
    _cap_self(int(raw_caps.pop("memory_bytes")), int(raw_caps.pop("cpu_seconds")))
    # Imported after the caps: the parsers' own imports count against them too.
    from qwen_gateway.documents.extract import Caps, Refusal, extract

    # Deep recursion in a parser must end as an exception, never as a C stack overflow.
    sys.setrecursionlimit(2000)
    try:
        text, pages = extract(path, Caps(**raw_caps))
    except Refusal as exc:
        return _refuse(exc.reason)
    except MemoryError:
        return _refuse("limits")
    except Exception:
        # A parser that breaks on these bytes: the file is malformed (the details stay here; hostile
        # input must not reach the server's log either).
        return _refuse("corrupt")
    out = sys.stdout.buffer
    out.write(json.dumps({"pages": pages}).encode() + b"\n")
    out.write(text.encode("utf-8", "surrogatepass"))
    out.flush()
    return 0


def _refuse(reason: str) -> int:
    sys.stderr.write(reason)
    sys.stderr.flush()
    return REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
