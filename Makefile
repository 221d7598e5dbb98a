# The two set-up commands of the README: `make run` and `make test`.
# Both bring up .venv idempotently with the pinned CPU stack first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test lint venv clean-venv bench

$(STAMP): requirements-cpu.txt requirements-torchrec.txt requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements-cpu.txt
	# never let pip resolve torchrec's own dependencies (CUDA fbgemm-gpu, newest torch)
	$(PY) -m pip install -q --no-deps -r requirements-torchrec.txt
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	.venv/bin/dimstream run

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP) peers-venv  # benchmarks/peers.py needs the peers' own venv
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf .venv

# The peers of benchmarks/peers.py (DeepCTR-Torch, FuxiCTR) in their own venv, never in .venv:
# every package pinned and installed with --no-deps, so pip cannot swap the local CPU torch.
.PHONY: peers-venv
peers-venv:
	test -x benchmarks/peers/.venv/bin/python || python3 -m venv benchmarks/peers/.venv
	benchmarks/peers/.venv/bin/python -m pip install -q --no-deps -r benchmarks/peers/requirements.txt
	benchmarks/peers/.venv/bin/python -m pip check
