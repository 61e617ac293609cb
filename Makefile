# The README's two commands: `make run` (the whole loop on the embedded default) and `make test`.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# torch is installed first and pinned, so no multi-gigabyte CUDA build is pulled in by a range.
TORCH  ?= torch==2.13.0

.PHONY: run test bench demo clean browser openwebui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/feedloop up

test: $(STAMP) browser
	$(MAKE) openwebui || echo "Open WebUI could not be installed: tests/e2e/test_openwebui.py will say why and skip"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Open WebUI for tests/e2e/test_openwebui.py, in a venv of its own (never feedloop's: it pins its own
# fastapi, pydantic, transformers...), beside the same CPU torch so no CUDA build is pulled in.
# About 75 s and 2.9 GB the first time (`make test` makes it; the test itself runs this when the venv
# is missing, and skips, saying why, only when it cannot be made).
OPENWEBUI_VENV    ?= .feedloop/openwebui-venv
OPENWEBUI_VERSION ?= 0.12.4
OPENWEBUI_STAMP   := $(OPENWEBUI_VENV)/.installed-$(OPENWEBUI_VERSION)

openwebui: $(OPENWEBUI_STAMP)

$(OPENWEBUI_STAMP):
	test -x $(OPENWEBUI_VENV)/bin/python || $(PYTHON) -m venv $(OPENWEBUI_VENV)
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(OPENWEBUI_VENV)/bin/python -m pip install --quiet $(TORCH) 'open-webui==$(OPENWEBUI_VERSION)'
	rm -f $(OPENWEBUI_VENV)/.installed-* && touch $@

# The console's browser tests (tests/e2e/test_console.py) drive Debian's chromium through Playwright
# (installed by the dev extra); Playwright's own browser download is not used. Installed here when
# missing: as root (CI on a fresh Debian machine), else through sudo.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Debian's chromium for the console's browser tests"; \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium; }

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	for b in bench/*.py; do [ $$b = bench/common.py ] || $(BIN)/python $$b || exit 1; done

# `make demo`: the embedded default in $(DEMO_HOME) (a fresh database every time; the bootstrap
# policy is built once and kept), the trainer on the default round config, trying a round every few
# seconds and promoting what passes the gates; `feedloop simulate` prints the round table and writes
# the JSON and the plot (win rate, drift per round and in total) beside it; then the loop is
# stopped. `make demo ROUNDS=12` runs twelve rounds; a round takes about a minute on two CPU cores,
# a minute or two more the first time (the bootstrap). A round trains once the oldest new feedback
# event has waited DEMO_ROUND_AFTER seconds, never on a count: simulated users send a round's
# feedback in a burst of a few seconds, and a count would start a round on part of a burst.
DEMO_HOME  ?= .feedloop/demo
DEMO_PORT  ?= 8077
DEMO_KEY   ?= fl-demo-operator-key
ROUNDS     ?= 5
DEMO_PREFERENCE ?= brevity
DEMO_ROUND_AFTER ?= 15
DEMO_ARGS  ?= --preference $(DEMO_PREFERENCE) --users 8 --rounds $(ROUNDS) --requests 600 --choices 1,2,4,4,4 --noise 0.1

demo: $(STAMP)
	rm -rf $(DEMO_HOME)/pg $(DEMO_HOME)/checkpoints/run-* && mkdir -p $(DEMO_HOME)
	@echo "feedloop up on port $(DEMO_PORT) (the first run bootstraps a policy: a minute or two); log: $(DEMO_HOME)/up.log"
	env -u DATABASE_URL FEEDLOOP_HOME=$(DEMO_HOME) FEEDLOOP_PORT=$(DEMO_PORT) FEEDLOOP_INIT_API_KEY=$(DEMO_KEY) \
	  FEEDLOOP_TRAIN_INTERVAL_SECONDS=5 FEEDLOOP_PROMOTION=auto FEEDLOOP_MIN_NEW_FEEDBACK=1000000000 \
	  FEEDLOOP_MAX_ROUND_INTERVAL_SECONDS=$(DEMO_ROUND_AFTER) \
	  $(BIN)/feedloop up > $(DEMO_HOME)/up.log 2>&1 & up=$$!; \
	trap 'kill $$up 2>/dev/null; wait $$up 2>/dev/null' EXIT INT TERM; \
	until $(BIN)/python -c "import httpx; httpx.get('http://127.0.0.1:$(DEMO_PORT)/ready').raise_for_status()" 2>/dev/null; do \
	  kill -0 $$up 2>/dev/null || { tail -n 30 $(DEMO_HOME)/up.log; exit 1; }; sleep 2; done; \
	$(BIN)/feedloop simulate --url http://127.0.0.1:$(DEMO_PORT) --api-key $(DEMO_KEY) \
	  --json $(DEMO_HOME)/simulation.json --png $(DEMO_HOME)/simulation.png $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .feedloop
