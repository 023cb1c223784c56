# Set-up lives here: every target creates (or reuses) the local virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptrace-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	@$(PY) -c "import importlib.util as u, sys; sys.exit('torchvision is installed; it breaks transformers on CPU: remove it' if u.find_spec('torchvision') else 0)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cliptrace demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
