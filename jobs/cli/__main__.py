"""``python -m jobs.cli``: the ``earmark`` executable."""

from jobs.cli import main

main()
