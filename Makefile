# Set-up and everyday commands. Everything installs into .venv (created on demand).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# make run
HOST ?= 127.0.0.1
PORT ?= 8000
BUNDLE ?=

# make model
SOURCE ?= google-bert/bert-base-chinese
OUT ?= out/bundle
VOCAB ?=
CORPUS ?=
RANDOM_INIT ?=

# make image / image-check (KIOSK=1: the image with the kiosk session)
KIOSK ?=

# make distill-compare
TEACHER ?= runs/wwm-4x128-mixed/checkpoint
MINUTES ?= 12

.PHONY: run test model default-model default-fusion distill-compare presets venv venv-dev browser dist arm-check image image-check bench clean help

help:
	@echo "make run    - serve the embedded default model on http://$(HOST):$(PORT)/"
	@echo "make test   - install everything and run the test suite"
	@echo "make model SOURCE=<hub id|preset|folder> OUT=<dir> [VOCAB=n] [CORPUS=path] [RANDOM_INIT=1]"
	@echo "make default-model [SHIP=1] - retrain the embedded default (seeded, eight phases, ~13.5 h on 2 cores)"
	@echo "make default-fusion [SHIP=1] - word LM + phrase memory + fitted fusion weights for the default (~10 min)"
	@echo "make distill-compare [TEACHER=ckpt] [MINUTES=n] - distilled vs scratch student vs teacher report"
	@echo "make presets - hub checkpoints: shapes, FLOPs, latency measured here (random weights)"
	@echo "make image [KIOSK=1] - flashable Raspberry Pi 3/4/400/Zero 2 W SD-card image in dist/ (root, loop devices)"
	@echo "make image-check [KIOSK=1] - boot that image under qemu-system-aarch64 and check the live system (root)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime only (what a board installs).
$(VENV)/.runtime-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# Runtime + toolchain + test dependencies (a workstation / CI).
$(VENV)/.dev-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[tools,test]'
	touch $@ $(VENV)/.runtime-stamp

venv: $(VENV)/.runtime-stamp
venv-dev: $(VENV)/.dev-stamp

run: $(VENV)/.runtime-stamp
	$(BIN)/python -m edge serve --host $(HOST) --port $(PORT) $(if $(BUNDLE),--bundle $(BUNDLE))

# Debian's chromium + chromedriver for the kiosk-page browser test (skipped without them),
# and the CJK and emoji fonts the page needs (the test fails when text falls back to boxes).
BROWSER_PACKAGES = chromium chromium-driver fonts-wqy-microhei fonts-noto-color-emoji
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	  [ -n "$$(fc-list :lang=zh family 2>/dev/null)" ] && [ -n "$$(fc-list :charset=1f52e family 2>/dev/null)" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null) || \
	    echo "note: $(BROWSER_PACKAGES) not all installed: the browser test will be skipped or fail on fonts"; }

test: $(VENV)/.dev-stamp browser
	$(BIN)/python -m pytest -q

model: $(VENV)/.dev-stamp
	$(BIN)/python -m tools build --source $(SOURCE) --out $(OUT) \
	  $(if $(VOCAB),--vocab $(VOCAB)) $(if $(CORPUS),--corpus $(CORPUS)) $(if $(RANDOM_INIT),--random-init)

# The embedded default model, reproduced from the repo (pretrain → bundles → report;
# SHIP=1 installs it as edge/default_bundle).
default-model: $(VENV)/.dev-stamp
	SHIP=$(SHIP) tools/train/train_default.sh

# The default's answer-time knowledge: word LM (../shared/data/lm), phrase memory of
# chinese-poetry's training split, fusion weights fitted on development data; report in
# runs/fused/eval/ (SHIP=1 installs it as edge/default_bundle).
default-fusion: $(VENV)/.dev-stamp
	SHIP=$(SHIP) tools/knowledge/fuse_default.sh

# TinyBERT-style distillation of a 2-layer student from TEACHER, against the same
# student trained from scratch for the same MINUTES; report in runs/distill/report/.
distill-compare: $(VENV)/.dev-stamp
	tools/train/distill_compare.sh $(TEACHER) $(MINUTES)

# Which checkpoint for which board: the preset table, each shape timed here.
presets: $(VENV)/.dev-stamp
	$(BIN)/python -m tools presets --measure --out out/presets --threads 2

# One offline-installable archive for a Pi (aarch64 wheels for Python 3.11 and 3.13,
# the package, the bundle(s), the units, install.sh / uninstall.sh).
dist: $(VENV)/.runtime-stamp
	tools/board/make_dist.sh $(if $(BUNDLE),--bundle $(BUNDLE))

# arm64 Debian root under qemu user-mode emulation: install the archive offline,
# run the runtime's tests and predictions, compare with x86 (needs root).
arm-check: dist
	tools/board/arm_check.sh

# A flashable SD-card image for the Raspberry Pi 3/4/400/Zero 2 W: Debian bookworm arm64
# from Debian's packages (debootstrap stage cached in /var/tmp) with the dist archive
# installed offline: dist/fillmask-edge-VERSION-rpi-arm64[-kiosk].img.xz, .sha256, .bmap
# (needs root and loop devices).
image: dist
	tools/board/make_image.sh $(if $(KIOSK),--kiosk)

# Boot the image under qemu-system-aarch64 (TCG, its own kernel and initrd) and check
# the live system through ports forwarded to 127.0.0.1 (needs root).
image-check:
	tools/board/image_check.sh $(if $(KIOSK),--kiosk)

# Side-by-side benchmark (PyTorch pipeline / plain ORT FP32 / this runtime) and the
# HTTP load test; results in out/bench/results.md, results.json, bench.png.
bench: $(VENV)/.dev-stamp
	$(BIN)/python -m tools bench --out out/bench

clean:
	rm -rf build dist *.egg-info .pytest_cache
