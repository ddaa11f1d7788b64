# docflow: `make run` starts the pipeline on embedded defaults, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := infra/kafka/libs

.PHONY: setup run test bench clean

setup: $(VENV)/.installed $(KAFKA_LIBS)/.fetched

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local,test]'
	touch $@

$(KAFKA_LIBS)/.fetched: infra/kafka/pom.xml
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f infra/kafka/pom.xml dependency:copy-dependencies
	touch $@

run: setup
	$(BIN)/docflow up --sample

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: setup
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	-$(BIN)/docflow kafka stop
	rm -rf .docflow $(KAFKA_LIBS)

# Benchmarks print figures (and write bench/results/); they are not tests.
bench: setup
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/e2e.py --backend hashing --scaling
	$(BIN)/python bench/e2e.py --backend local
