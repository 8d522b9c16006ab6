# One venv, created on first use. torch goes in first as torch==2.13.0 (a local CPU build on the
# project machines); pyproject keeps a wide range so other machines can use their own build.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: demo demo-quick test test-slow test-browser lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.2"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qdistill demo --out $(OUT)

demo-quick: $(STAMP)
	$(VENV)/bin/qdistill demo --quick --out out/demo-quick

# the quick suite plus every docstring example (run as doctests against the installed package)
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules --pyargs qdistill -o addopts=""

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# report.html and index.html in headless Chromium (Debian's packages; installed here when missing)
test-browser: $(STAMP)
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	QDISTILL_BROWSER_TESTS=1 $(PY) -m pytest -q -m browser

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/qat_kd_bench.py

clean:
	rm -rf out .pytest_cache
