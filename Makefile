# The two commands of the README: `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo demo-loop test test-fast lint demo-model bench
SHELL := /bin/bash
PACKAGES := records asr demo cluster jobs labeling serve
# the test process computes too (engine tests): it runs with earmark's allocator settings
PYTEST := env $$(.venv/bin/python -m cluster.runtime) .venv/bin/python -m pytest

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/earmark demo

# The closed loop on a new accent (transcribe, route, review, export, fine-tune, evaluate, gate): ~6-10 min on 2 cores.
demo-loop: setup
	.venv/bin/earmark demo loop --out build/loop

# Everything, against real services: what CI and the README run (lint first).
test:
	@scripts/setup.sh --test
	$(MAKE) --no-print-directory lint
	scripts/postgres.sh
	EARMARK_REQUIRE_POSTGRES=1 $(PYTEST) -q tests

# The inner loop: the tests not marked slow (no model training, no Ray jobs, no browser), ~1.5 min.
test-fast:
	@scripts/setup.sh --test
	scripts/postgres.sh
	EARMARK_REQUIRE_POSTGRES=1 $(PYTEST) -q -m "not slow" tests

# Style, types, the architecture's import rules (pyproject.toml's [tool.importlinter]) and dead code.
# vulture reads the tests and benchmarks for uses, and reports only what is unused in the packages.
lint: setup
	.venv/bin/ruff check $(PACKAGES) tests benchmarks scripts
	.venv/bin/ruff format --check $(PACKAGES) tests benchmarks scripts
	.venv/bin/mypy
	.venv/bin/lint-imports
	@dead=$$(.venv/bin/vulture | grep -Ev '^(tests|benchmarks)/' || true); \
	if [ -n "$$dead" ]; then echo "$$dead"; echo "vulture: dead code in the packages (delete it; a name only a framework uses goes in ignore_names)"; exit 1; fi

# Rebuild the bundled demo model from scratch (about 1 h on 2 CPU cores; keep the machine otherwise idle).
demo-model: setup
	.venv/bin/python -m demo.train --work build/demo-model --train 12000 --minutes 60 --max-steps 4500 --vocab 256 --lr 3e-3 --eval-every 300
	.venv/bin/python -m demo.card --model build/demo-model/best.nemo --install --train-log build/demo-model/evals.jsonl

bench: setup
	.venv/bin/python benchmarks/streaming_cost.py
	.venv/bin/python benchmarks/transcribe_throughput.py
	.venv/bin/python benchmarks/manifest_scale.py
	.venv/bin/python benchmarks/queue_claims.py
	.venv/bin/python benchmarks/route_scale.py
