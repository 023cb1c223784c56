# Set-up lives here: every target creates (or reuses) the local virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptrace-installed

# open_clip pulls in torchvision, which breaks transformers beside the CPU torch 2.13.0 of .venv, and no torchvision
# wheel here loads with CPU torch 2.13.0. Its tests run in a second environment holding a torch/torchvision pair
# that loads: the CUDA build of torch 2.14.1 (runs on CPU; about 6 GB installed) with torchvision 0.29.1 on x86_64,
# torch 2.9.1 with torchvision 0.24.1 on aarch64.
OPEN_CLIP_VENV ?= .venv-openclip
OPEN_CLIP_PY := $(OPEN_CLIP_VENV)/bin/python
OPEN_CLIP_STAMP := $(OPEN_CLIP_VENV)/.cliptrace-installed
OPEN_CLIP_TORCH := $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: install demo test clean chromium open-clip-env

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	@$(PY) -c "import importlib.util as u, sys; sys.exit('torchvision is installed; it breaks transformers on CPU: remove it' if u.find_spec('torchvision') else 0)"
	touch $(STAMP)

install: $(STAMP)

$(OPEN_CLIP_STAMP): pyproject.toml
	test -x $(OPEN_CLIP_PY) || $(PYTHON) -m venv $(OPEN_CLIP_VENV)
	$(OPEN_CLIP_PY) -m pip install --quiet --upgrade pip
	$(OPEN_CLIP_PY) -m pip install --quiet $(OPEN_CLIP_TORCH)
	$(OPEN_CLIP_PY) -m pip install --quiet $(OPEN_CLIP_TORCH) -e ".[dev,open_clip]"
	$(OPEN_CLIP_PY) -c "import open_clip, torchvision, transformers.models.clip"
	touch $(OPEN_CLIP_STAMP)

open-clip-env: $(OPEN_CLIP_STAMP)

demo: $(STAMP)
	$(VENV)/bin/cliptrace demo

# The report's browser test drives Debian's chromium. Where apt-get can run (root, as in CI) a missing chromium is
# installed and a failed install stops here; elsewhere the test is skipped with a message.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "chromium is not installed and apt-get cannot run here: the browser test will be skipped"; fi; }

# The main suite, then the open_clip tests in their environment, where a skip fails (tests/conftest.py) and so does
# collecting none (pytest's exit code 5).
test: $(STAMP) $(OPEN_CLIP_STAMP) chromium
	$(PY) -m pytest
	CLIPTRACE_REQUIRE_OPEN_CLIP=1 $(OPEN_CLIP_PY) -m pytest -m open_clip

clean:
	rm -rf $(VENV) $(OPEN_CLIP_VENV) runs .pytest_cache artifacts
