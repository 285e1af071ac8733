#!/usr/bin/env bash
# airflow-init of docker-compose.yml: runs once, as root, before every other Airflow
# service starts (they wait for it to complete successfully). Any failing step fails it,
# and with it `docker compose up`.
#
#   1. create the folders the tasks write (logs, NIGHTSCORE_HOME) and the plugins folder
#   2. migrate Airflow's metadata database (FAB's user tables included)
#   3. create the admin user from .env, or set its password to the one in .env
#   4. create or upgrade the serving database's schemas, roles and use case tables
#   5. hand the written folders to AIRFLOW_UID:0, as the official compose file does
#
# Runs outside Docker too (tests/integration/test_init_script.py): every path comes from
# the environment.
set -euo pipefail

: "${AIRFLOW_UID:?AIRFLOW_UID is not set (the uid the Airflow services run as, e.g. 50000)}"
: "${AIRFLOW_HOME:?AIRFLOW_HOME is not set}"
: "${NIGHTSCORE_HOME:?NIGHTSCORE_HOME is not set (the volume every worker mounts)}"
: "${NIGHTSCORE_DATABASE_URL:?NIGHTSCORE_DATABASE_URL is not set (the serving database)}"
: "${AIRFLOW_ADMIN_USERNAME:?AIRFLOW_ADMIN_USERNAME is not set (see .env.example)}"
: "${AIRFLOW_ADMIN_PASSWORD:?AIRFLOW_ADMIN_PASSWORD is not set (see .env.example)}"
: "${AIRFLOW_ADMIN_EMAIL:=${AIRFLOW_ADMIN_USERNAME}@localhost}"

step() { printf '\n==> %s\n' "$*"; }

written=("${AIRFLOW_HOME}/logs" "${NIGHTSCORE_HOME}")

step "creating ${written[*]} and ${AIRFLOW_HOME}/plugins"
mkdir -p "${written[@]}" "${AIRFLOW_HOME}/plugins"

step "migrating Airflow's metadata database"
airflow db migrate

step "admin user ${AIRFLOW_ADMIN_USERNAME}"
airflow users create --role Admin --username "${AIRFLOW_ADMIN_USERNAME}" \
    --email "${AIRFLOW_ADMIN_EMAIL}" --firstname Admin --lastname User \
    --password "${AIRFLOW_ADMIN_PASSWORD}"
# `users create` leaves an existing user alone: .env stays the one source of the password.
airflow users reset-password --username "${AIRFLOW_ADMIN_USERNAME}" \
    --password "${AIRFLOW_ADMIN_PASSWORD}"

step "serving database: schemas, roles and use case tables"
nightscore db init

step "handing ${written[*]} to ${AIRFLOW_UID}:0"
chown -R "${AIRFLOW_UID}:0" "${written[@]}"

step "airflow-init done"
