"""The ``earmark`` executable (also ``python -m jobs``): the CLI of :mod:`jobs.cli`, in a process
with earmark's allocator settings (see :data:`cluster.runtime.ALLOCATOR_ENV`). Nothing heavy is
imported before the restart that applies them."""

from __future__ import annotations

import sys


def main() -> None:
    from cluster.runtime import restart_with_allocator_env

    if len(sys.argv) > 1 and not {"--help", "-h", "--version"} & set(sys.argv):  # help stays instant
        restart_with_allocator_env()
    from jobs.cli import app

    sys.exit(app())


if __name__ == "__main__":
    main()
