# The two commands of the README: `make demo` and `make test`. Both set everything up first.
.PHONY: setup demo demo-loop test lint demo-model bench
SHELL := /bin/bash

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/earmark demo

# The closed loop on a new accent (transcribe, route, review, export, fine-tune, evaluate, gate): ~4.5 min on 2 cores.
demo-loop: setup
	.venv/bin/earmark demo loop --out build/loop

test:
	@scripts/setup.sh --test
	scripts/postgres.sh
	# the test process computes too (engine tests): it runs with earmark's allocator settings
	env $$(.venv/bin/python -m cluster.runtime) EARMARK_REQUIRE_POSTGRES=1 .venv/bin/python -m pytest -q tests

lint: setup
	.venv/bin/ruff check asr cluster jobs labeling serve tests
	.venv/bin/mypy asr cluster jobs

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
