# The two set-up commands of README.md: `make train` (the main job) and `make test` (every test).
# Both create .venv on first use with nothing but Python 3.10+ installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env train test check-sync nbtest nbtest-slow pytest clean

env: $(STAMP)
	@# headless Chromium for the browser test of report.html (tests/test_report.py)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium) || sudo sh -c 'apt-get update -qq && apt-get install -y -qq chromium'

$(STAMP): settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job: train on the real ELPV solar-cell data and print the metrics.
train: env
	$(BIN)/fastcls train $(ARGS)

# Every test: nbdev sync and clean checks, the notebooks (slow cells included), then pytest.
test: env check-sync nbtest pytest

check-sync: env
	PATH=$(abspath $(BIN)):$$PATH bash .ci/check_sync

nbtest: env
	$(BIN)/nbdev-test --n-workers 2 --flags slow

pytest: env
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests; rc=$$?; [ $$rc -eq 5 ] && echo "pytest collected no tests" && exit 1; exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info
