"""``python -m jobs``: the ``earmark`` executable (:func:`jobs.cli.main`)."""

from jobs.cli import main

main()
