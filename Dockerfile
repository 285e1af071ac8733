# The Airflow image for docker-compose.yml: the official image plus what nightscore needs on
# top of it. DAGs, use cases, plugins and (editable) pipeline/ and sql/ are mounted by the
# compose file; the copies baked in here make the image work on its own too.
#
# Dependencies: apache/airflow already holds Airflow 3.3.2 with its providers (celery,
# postgres, smtp, fab, ...) and their dependencies, installed with the image's constraints
# (${HOME}/constraints.txt). requirements-runtime.lock (make lock: pyproject.toml without
# the dev tools and without the embedded PostgreSQL) was resolved on its own and pins some
# of those packages to other versions, so installing all of it would up- or downgrade what
# the image's providers were built and tested with. Instead, install from the lock, with
# its hashes, only the distributions the image lacks (scikit-learn, the ADBC driver,
# matplotlib and their dependencies), keep the image's versions of everything else, and let
# `pip check` fail the build if the two do not fit together.
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:root requirements-runtime.lock pyproject.toml README.md /opt/nightscore/src/
COPY --chown=airflow:root docker /opt/nightscore/src/docker
RUN python /opt/nightscore/src/docker/missing_requirements.py \
        /opt/nightscore/src/requirements-runtime.lock > /tmp/missing.lock \
 && sed -n '/^[^ ]/p' /tmp/missing.lock \
 && pip install --no-cache-dir --require-hashes --no-deps -r /tmp/missing.lock \
 && rm /tmp/missing.lock

COPY --chown=airflow:root pipeline /opt/nightscore/src/pipeline
COPY --chown=airflow:root sql /opt/nightscore/src/sql
COPY --chown=airflow:root usecases /opt/nightscore/src/usecases
COPY --chown=airflow:root dags /opt/airflow/dags
RUN pip install --no-cache-dir --no-deps -e /opt/nightscore/src \
 && pip check
