# The two commands a newcomer needs: `make demo` and `make test` (both set up .venv first).
.PHONY: setup test lint demo

setup:
	bash scripts/setup.sh

lint: setup
	.venv/bin/ruff check .

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/opd demo
