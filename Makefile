# docflow: `make run` starts the pipeline on embedded defaults, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := infra/kafka/libs
HADOOP_LIBS := infra/hadoop/libs
SPARK_JOBS := jobs/spark
FLINK_JOBS := jobs/flink

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed $(KAFKA_LIBS)/.fetched

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local,ocr,test]'
	touch $@

$(KAFKA_LIBS)/.fetched: infra/kafka/pom.xml
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f infra/kafka/pom.xml dependency:copy-dependencies
	touch $@

# The local HDFS (`docflow hdfs start`, the tests' fixture): Hadoop's jars from Maven Central.
.PHONY: hdfs-libs
hdfs-libs: $(HADOOP_LIBS)/.fetched

$(HADOOP_LIBS)/.fetched: infra/hadoop/pom.xml
	rm -rf $(HADOOP_LIBS)
	mvn -q -B -f infra/hadoop/pom.xml dependency:copy-dependencies
	touch $@

# The analytics jobs (jobs/*), each in a virtualenv of its own, never .venv: apache-flink's
# pins break PySpark's Arrow features in a shared one. `make test` builds them, `make run`
# needs none. Each job's jars come from Maven Central through its pom.xml: the Spark job's
# spark-sql-kafka and the three jars it needs beside pyspark's own (passed in spark.jars), the
# Flink job's Kafka SQL connector (added through pipeline.jars).
.PHONY: jobs
jobs: $(SPARK_JOBS)/.venv/.installed $(SPARK_JOBS)/lib/.fetched
jobs: $(FLINK_JOBS)/.venv/.installed $(FLINK_JOBS)/lib/.fetched

jobs/%/.venv/.installed: jobs/%/requirements.txt
	test -x jobs/$*/.venv/bin/python || $(PYTHON) -m venv jobs/$*/.venv
	jobs/$*/.venv/bin/python -m pip install -q --upgrade pip
	jobs/$*/.venv/bin/python -m pip install -q -r $<
	touch $@

jobs/%/lib/.fetched: jobs/%/pom.xml
	rm -rf jobs/$*/lib
	mvn -q -B -f $< dependency:copy-dependencies
	touch $@

run: setup
	$(BIN)/docflow up --sample

# The page's browser test drives Debian's Chromium and its driver, never a downloaded browser:
# installed here when missing (as root), else the command to install them is printed.
BROWSER_PACKAGES := chromium chromium-driver
.PHONY: browser
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs: sudo apt-get install $(BROWSER_PACKAGES)"; exit 1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES); \
	fi

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: setup jobs hdfs-libs browser
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# ruff's rules and format are in pyproject.toml; CI runs this before the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	-$(BIN)/docflow kafka stop
	-$(BIN)/docflow hdfs stop
	rm -rf .docflow $(KAFKA_LIBS) $(HADOOP_LIBS) $(SPARK_JOBS)/lib $(SPARK_JOBS)/.venv $(FLINK_JOBS)/lib $(FLINK_JOBS)/.venv

# Benchmarks print figures, write bench/results/ and then BENCHMARKS.md; they are not tests.
bench: setup $(VENV)/.bench-installed
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/e2e.py --backend hashing --scaling --profile bench/results/profile-hashing
	$(BIN)/python bench/e2e.py --backend local
	$(BIN)/python bench/e2e.py --backend local --precision int8
	$(BIN)/python bench/search.py
	$(BIN)/python bench/report.py

$(VENV)/.bench-installed: setup.cfg
	$(BIN)/python -m pip install -q -e '.[local,test,bench]'
	touch $@
