# Set-up lives here: every target creates (or reuses) the local virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cliptrace-installed

.PHONY: install demo test clean chromium

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

# The report's browser test drives Debian's chromium. Where apt-get can run (root, as in CI) a missing chromium is
# installed and a failed install stops here; elsewhere the test is skipped with a message.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	  else echo "chromium is not installed and apt-get cannot run here: the browser test will be skipped"; fi; }

test: $(STAMP) chromium
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache artifacts
