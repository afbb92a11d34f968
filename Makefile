# edgebuild — developer and CI entry points.
#   make demo   set up, fetch the default model, run the main job on it
#   make test   set up and run the test suite (CI runs this)
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA_DIR ?= $(abspath ../shared/data)
OUT      ?= out
TARGET   ?= local
export EDGEBUILD_DATA_DIR ?= $(DATA_DIR)

.PHONY: setup sshd model test test-slow demo smoke bench-compress clean help

help:
	@echo "make demo | test | test-slow | smoke | bench-compress | setup | model | clean"

$(BIN)/.installed: pyproject.toml device_agent/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e "./device_agent[runtime]" -e ".[test]"
	touch $@

setup: $(BIN)/.installed sshd

# The SSH transport's tests start a real OpenSSH server on 127.0.0.1.
sshd:
	@test -x /usr/sbin/sshd || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null) \
	  || echo "openssh-server is not installed: the SSH tests will be skipped"; }

model: setup
	$(BIN)/edgebuild model fetch smollm2-135m

test: setup model
	$(BIN)/pytest -q

test-slow: setup model
	$(BIN)/pytest -q -m slow

smoke: setup
	$(BIN)/edgebuild all --model tiny-random --target local --profile smoke --data-dir $(DATA_DIR) --out $(OUT)/smoke

demo: setup model
	$(BIN)/edgebuild all --model smollm2-135m --target $(TARGET) --config configs/demo.toml --data-dir $(DATA_DIR) --out $(OUT)/demo

# Every compression method next to rtn at matching bits/weight, on the default model, in one run.
bench-compress: setup model
	$(BIN)/python -m edgebuild.compress.benchmark --model smollm2-135m --data-dir $(DATA_DIR) --json $(OUT)/bench-compress.json

clean:
	rm -rf $(OUT) .pytest_cache .setuptools-build device_agent/.setuptools-build
