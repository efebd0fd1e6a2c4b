# Two commands on a fresh machine:  `make restore` (the main job on the embedded default) and `make test`.
# Both create .venv on first use from the pinned CPU lock file (requirements/cpu.txt).
PY := .venv/bin/python
ARGS ?=

.venv/.installed: requirements/cpu.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

.PHONY: install restore test gpu-test
install: .venv/.installed

restore: .venv/.installed
	.venv/bin/linearard restore $(ARGS)

test: .venv/.installed
	$(PY) -m pytest -q tests $(ARGS)
