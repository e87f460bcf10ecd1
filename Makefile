# fedkeys: `make demo` runs the main job end to end; `make test` runs every test.
# Both set up .venv first (torch==2.13.0 before everything else: a bare `torch` pulls CUDA).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
ART    := artifacts

.PHONY: setup demo bundle-full test test-hypothesis lint typecheck unit bench arm64-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q executorch==1.5.1
	$(BIN)/pip install -q -e ".[all]"
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: export the demo bundle from the shipped student (models/demo: no training), show
# a few suggestions, then federated training of a simulated fleet against a coordinator started
# over TLS (secure aggregation and compression on); ends with the summary table and the report.
demo: setup
	$(BIN)/fedkeys export build --profile demo --student models/demo --out $(ART)/demo/bundle --work $(ART)/work --no-eval
	@for t in "how are " "see you tomor"; do \
	  echo "--- suggestions after '$$t'"; $(BIN)/fedkeys suggest --bundle $(ART)/demo/bundle "$$t"; done
	$(BIN)/fedkeys simulate --bundle $(ART)/demo/bundle --out $(ART)/sim

# The full build of the demo bundle (tokenizer, teacher, distilled student: 10-45 min on 2 cores),
# with its evaluation; ships the student it trained to $(ART)/demo/student (see models/README.md).
bundle-full: setup
	$(BIN)/fedkeys export build --profile demo --out $(ART)/demo-full/bundle --work $(ART)/work --save-student $(ART)/demo/student

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Hypothesis derandomized (the "ci" profile of tests/conftest.py): the same examples every run;
# each test has pyproject's time limit (`timeout`): a hang fails that test with every thread's stack.
# The client's suite runs first as on a device's install (tests/conftest.py, --client-only: what a
# device lacks is unimportable; the tiny bundle built here), then everything else.
unit: setup
	HYPOTHESIS_PROFILE=ci FEDKEYS_TEST_TINY_BUNDLE="$$($(BIN)/python -m tests.servers)" \
	  $(BIN)/pytest -q -n 2 --client-only -p no:hydra_pytest --durations=5
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest -q -n 2 --skip-client-suite --durations=15

test: lint typecheck unit

# The property tests only, drawn at random with ten times the examples (not part of `make test`).
test-hypothesis: setup
	HYPOTHESIS_PROFILE=long $(BIN)/pytest -q -n 2 -m hypothesis --timeout 1800 --durations=15

bench: setup
	$(BIN)/python bench/model_bench.py

# The client in an emulated Debian bookworm arm64 (Raspberry Pi OS 64-bit; proot-distro's Debian on
# Android): installed as the README says, its suggestions against the host's, one real round of
# three arm64 devices. Root, about an hour on 2 cores; not part of `make test`.
arm64-check: setup
	sh deploy/arm64-check.sh

clean:
	rm -rf $(ART) .pytest_cache .mypy_cache .ruff_cache
