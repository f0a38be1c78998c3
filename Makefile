# Two commands for a fresh machine with only Python: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Message catalogues of the web app: the .po files are committed, the .mo files are built here.
CATALOGUES := $(wildcard connector/web/translations/*/LC_MESSAGES/messages.po)
COMPILED := $(CATALOGUES:.po=.mo)

.PHONY: run test lint bench clean messages browser pdf-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml setup.cfg
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

.env:
	$(BIN)/crm-approvals init

## run: install, migrate, start server + worker (+ sandbox CRM when no CRM is configured)
run: $(STAMP) $(COMPILED) .env
	$(BIN)/crm-approvals run

## test: install the dev extras and run the whole suite
test: $(STAMP) $(COMPILED) browser pdf-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

%.mo: %.po $(STAMP)
	$(BIN)/pybabel compile --statistics -i $< -o $@

## messages: collect the web app's texts into the catalogues (then translate the new ones)
messages: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg --no-location -o connector/web/translations/messages.pot .
	$(BIN)/pybabel update --no-fuzzy-matching -i connector/web/translations/messages.pot -d connector/web/translations

## browser: Debian's chromium + chromium-driver for the browser tests (apt-get, when root and missing)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "chromium/chromedriver not found and cannot install them: the browser tests will skip"; fi

## pdf-deps: pango for WeasyPrint (PDF documents) and poppler-utils (pdftoppm, the docs' page image)
pdf-deps:
	@if ldconfig -p 2>/dev/null | grep -q libpango-1.0 && command -v pdftoppm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core poppler-utils; \
	else echo "pango/poppler-utils not found and cannot install them: the document tests will skip"; fi

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) var build *.egg-info
