# edgebuild — developer and CI entry points.
#   make demo   set up, fetch the default model, run the main job on it
#   make test   set up and run the test suite (CI runs this)
#   make hil    the tiny model built and validated on an emulated Raspberry Pi 4 (JUnit out)
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA_DIR ?= $(abspath ../shared/data)
OUT      ?= out
TARGET   ?= local
export EDGEBUILD_DATA_DIR ?= $(DATA_DIR)

.PHONY: setup sshd bwrap emulator model docs test test-slow test-gpu test-emulated demo smoke hil faults bench-compress bench-device bench-host bench-suite bench-runtime report-screenshot clean help

help:
	@echo "make demo | test | test-slow | test-gpu | test-emulated | smoke | hil | faults | bench-compress | bench-device | bench-host | bench-suite | bench-runtime | report-screenshot | docs | setup | model | clean"

# A quiet install: pyproject.toml declares the package data exactly (no data folder is taken
# for a package), and the filter drops only setuptools' notice that an install is editable.
$(BIN)/.installed: pyproject.toml device_agent/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -c constraints.txt -e "./device_agent[runtime]" -e ".[test,lab,ray]"
	touch $@

setup: $(BIN)/.installed sshd bwrap

# The SSH transport's tests start a real OpenSSH server on 127.0.0.1.
sshd:
	@test -x /usr/sbin/sshd || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null) \
	  || echo "openssh-server is not installed: the SSH tests will be skipped"; }

# Generated code (HumanEval, MBPP) runs in a bubblewrap sandbox; without it the code benchmarks
# are unavailable unless --allow-unsandboxed-code is given.
bwrap:
	@command -v bwrap >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
	  || echo "bubblewrap is not installed: code benchmarks are unavailable and the sandbox tests will be skipped"; }

# The key references, generated from the config and target spec schemas (a test checks they are current).
docs: setup
	$(BIN)/edgebuild config docs --write docs/config.md
	$(BIN)/edgebuild targets docs --write docs/targets.md

# Emulated boards (make hil, make test-emulated) run arm64 programs through qemu-user and build
# their root filesystem with debootstrap (as root).
emulator:
	@command -v qemu-aarch64-static >/dev/null && command -v update-binfmts >/dev/null && \
	  command -v debootstrap >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	   qemu-user-static binfmt-support debootstrap >/dev/null); } || \
	  echo "qemu-user-static, binfmt-support or debootstrap is not installed: emulated boards will not start"

model: setup
	$(BIN)/edgebuild model fetch smollm2-135m

test: setup model
	$(BIN)/pytest -q

test-slow: setup model
	$(BIN)/pytest -q -m slow

# Emulated-board tests: start Raspberry Pi boards under qemu-user (root; minutes, the first time
# longer: the board's root filesystem is built once under $EDGEBUILD_HOME/emulate).
test-emulated: setup emulator
	$(BIN)/pytest -q -m emulated

# Needs a CUDA device (and Triton, which CUDA builds of torch bring).
test-gpu: setup
	$(BIN)/pytest -q -m gpu

smoke: setup
	$(BIN)/edgebuild all --model tiny-random --target local --profile smoke --data-dir $(DATA_DIR) --out $(OUT)/smoke

# Hardware in the loop without the hardware: start an emulated Raspberry Pi (HIL_BOARD), install
# the agent on it as on a real board, build the tiny model and validate every stage there
# (configs/hil.toml: smoke profile, every stage), write JUnit to $(OUT)/hil/junit.xml, stop the
# board, also on failure. Exit codes 10 and 11 are results, not errors. Needs root.
HIL_BOARD ?= rpi4
hil: setup emulator
	@t0=$$(date +%s); lap() { echo "hil: $$1 after $$(( $$(date +%s) - t0 )) s"; }; \
	  $(BIN)/edgebuild device emulate start $(HIL_BOARD) --fresh >/dev/null && lap "board started" && \
	  trap '$(BIN)/edgebuild device emulate stop $(HIL_BOARD)-emu >/dev/null' EXIT && \
	  $(BIN)/edgebuild device setup --target $(HIL_BOARD)-emu >/dev/null && lap "agent installed" && \
	  mkdir -p $(OUT)/hil && $(BIN)/edgebuild device check --target $(HIL_BOARD)-emu >$(OUT)/hil/device.json && \
	  { $(BIN)/edgebuild all --model tiny-random --target $(HIL_BOARD)-emu --config configs/hil.toml \
	      --data-dir $(DATA_DIR) --out $(OUT)/hil --junit $(OUT)/hil/junit.xml; rc=$$?; \
	    lap "build finished"; \
	    if [ $$rc -eq 10 ] || [ $$rc -eq 11 ]; then echo "hil: exit code $$rc (see $(OUT)/hil/$(HIL_BOARD)-emu/report.md)"; rc=0; fi; \
	    exit $$rc; }

# Fault injection: tiny-model builds against a real sshd on 127.0.0.1 behind a relay that cuts or
# stalls the link, and one in a network namespace whose link nftables cuts; the agent killed or held
# mid-upload, -load, -timing and -scoring and killed at points drawn at random (SEED= repeats a
# draw), a reboot, a device lost for good, bad model, config, target and data, a corrupt package and
# cache entry, a concurrent build, Ctrl-C. Prints one row per scenario (exit code, its one-line
# message, whether earlier outputs survived by their hashes, whether a completed build wrote its
# manifest) and writes the table to $(OUT)/faults/faults.md. Needs root for the namespace.
SEED ?=
faults: setup sshd
	@command -v nft >/dev/null || { command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null) \
	  || echo "nftables is not installed: the namespace scenario will fail"; }
	$(BIN)/python tests/faults.py --work $(OUT)/faults $(if $(SEED),--seed $(SEED))

# Exit codes 10 (a less compressed stage shipped) and 11 (the baseline shipped) are results, not errors.
demo: setup model
	$(BIN)/edgebuild all --model smollm2-135m --target $(TARGET) --config configs/demo.toml --data-dir $(DATA_DIR) --out $(OUT)/demo; \
	  rc=$$?; if [ $$rc -eq 10 ] || [ $$rc -eq 11 ]; then echo "demo finished: exit code $$rc (see out/demo/$(TARGET)/report.html)"; exit 0; fi; exit $$rc

# Every compression method next to rtn at matching bits/weight, on the default model, in one run.
bench-compress: setup model
	$(BIN)/edgebuild measure compress --model smollm2-135m --data-dir $(DATA_DIR) --json $(OUT)/bench-compress.json

# Host benchmarks through edgebuild next to lm-eval's stock hf model, same model, items and few-shot
# examples (PROFILE=full for whole sets; BENCH_TASKS picks the benchmarks). lm-eval's hf model runs
# every answer choice with its full 10-shot prompt: full HellaSwag takes it many hours on 2 cores
# (BENCH_DEVICE=cuda runs both sides on a GPU; BENCH_DTYPE=bfloat16 in bf16 weights; BENCH_FEWSHOT=N
# gives every task N few-shot examples instead of the suite's counts, e.g. 0 as lm-eval's own defaults).
PROFILE ?= reduced
BENCH_TASKS ?= arc_easy,piqa,hellaswag
BENCH_DEVICE ?= cpu
BENCH_DTYPE ?= float32
BENCH_FEWSHOT ?=
bench-host: setup model
	$(BIN)/edgebuild measure host --model smollm2-135m --data-dir $(DATA_DIR) --profile $(PROFILE) --tasks $(BENCH_TASKS) --device $(BENCH_DEVICE) --dtype $(BENCH_DTYPE) $(if $(BENCH_FEWSHOT),--num-fewshot $(BENCH_FEWSHOT)) --json $(OUT)/bench-host.json

# Host benchmarks through edgebuild next to the lm_eval command run as its own process (lm_eval --model hf
# on the model's folder), same items and few-shot examples, in one run: items/s of each and the two
# scores side by side (they must agree within 1 point). SUITE_PROFILE / SUITE_TASKS pick the items.
SUITE_PROFILE ?= quick
SUITE_TASKS ?= arc_easy,piqa,hellaswag,gsm8k
bench-suite: setup model
	$(BIN)/edgebuild measure suite --model smollm2-135m --data-dir $(DATA_DIR) --profile $(SUITE_PROFILE) --tasks $(SUITE_TASKS) --json $(OUT)/bench-suite.json

# Each stage artifact of the demo build in the device agent and in torch, side by side (run `make demo` first).
bench-device: setup
	$(BIN)/edgebuild measure device --out $(OUT)/demo --target $(TARGET) --json $(OUT)/bench-device.json

# Every runtime encoding of the default model in the device agent next to llama.cpp on the same model
# (its shipped Q4_1 GGUF and llama.cpp's Q8_0/Q4_0 requantisations), one table, 2 threads; BUILD_DIR=
# out/demo/local adds the compressed stages of a build. llama.cpp is a benchmark-only dependency (the
# bench extra), built from source once (~10 min of CPU) without native flags: these CPUs report AMX,
# which the VM faults on.
BUILD_DIR ?=
bench-runtime: setup model
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/edgebuild measure runtime --model smollm2-135m --data-dir $(DATA_DIR) $(if $(BUILD_DIR),--build-dir $(BUILD_DIR)) --work $(OUT)/bench-runtime --json $(OUT)/bench-runtime.json

# A PNG of report.html rendered by headless Chromium (apt package chromium-headless-shell or chromium).
report-screenshot: setup
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get install -y -qq chromium-headless-shell >/dev/null; } || true
	$(BIN)/edgebuild report --html --out $(OUT)/demo --target $(TARGET)
	$(BIN)/python scripts/screenshot_report.py $(OUT)/demo/$(TARGET)/report.html $(OUT)/demo/$(TARGET)/report.png

clean:
	rm -rf $(OUT) .pytest_cache .setuptools-build device_agent/.setuptools-build
