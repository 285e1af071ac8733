# The Airflow image for docker-compose.yml: the official image plus the locked
# dependencies and the nightscore package (DAGs and use cases are mounted, not baked in).
FROM apache/airflow:3.3.2-python3.11

COPY --chown=airflow:root requirements.lock pyproject.toml README.md /opt/nightscore/src/
COPY --chown=airflow:root pipeline /opt/nightscore/src/pipeline
COPY --chown=airflow:root sql /opt/nightscore/src/sql
COPY --chown=airflow:root usecases /opt/nightscore/src/usecases
RUN pip install --no-cache-dir --require-hashes -r /opt/nightscore/src/requirements.lock \
 && pip install --no-cache-dir --no-deps -e /opt/nightscore/src
