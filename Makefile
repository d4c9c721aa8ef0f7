# OSAD Studio — `make run` sets up and starts the app, `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Loopback by default; `make run HOST=0.0.0.0` listens on every interface (login required then).
HOST   ?= 127.0.0.1

.PHONY: run test setup worker clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.headless true --browser.gatherUsageStats false

test: $(STAMP)
	$(PY) -m pytest -q

worker: $(STAMP)
	$(PY) -m osad_core worker

clean:
	rm -rf $(VENV) .pytest_cache
