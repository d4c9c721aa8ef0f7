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

# Database tests run on SQLite and on the PostgreSQL server of OSAD_TEST_POSTGRES_URL;
# when that is unset but PostgreSQL's server binaries exist, on a throw-away cluster.
test: $(STAMP)
	@if [ -z "$$OSAD_TEST_POSTGRES_URL" ] && scripts/pg_tmp.sh bindir >/dev/null 2>&1; then \
		echo "scripts/pg_tmp.sh run $(PY) -m pytest -q"; scripts/pg_tmp.sh run $(PY) -m pytest -q; \
	else \
		echo "$(PY) -m pytest -q"; $(PY) -m pytest -q; \
	fi

worker: $(STAMP)
	$(PY) -m osad_core worker

clean:
	rm -rf $(VENV) .pytest_cache
