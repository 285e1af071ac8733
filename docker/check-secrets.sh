#!/bin/sh
# Refuses to let `docker compose up` start anything while a secret of .env is a placeholder
# (change-me), empty, too short or malformed: run by the check-secrets service, which every
# other service waits for. Prints each bad secret, what it must be and how to make one.
set -u

bad=0
refuse() {  # name, what it must be, the command that generates one
    echo "check-secrets: $1 in .env $2; generate one with: $3" >&2
    bad=1
}

# name, minimum length, the command that generates one
check() {
    eval "value=\${$1-}"
    case "$value" in
        "") refuse "$1" "is empty" "$3"; return ;;
        *change-me*|*changeme*|*CHANGE-ME*|*CHANGEME*)
            refuse "$1" "is still the placeholder of .env.example ($value)" "$3"; return ;;
    esac
    if [ "${#value}" -lt "$2" ]; then
        refuse "$1" "has ${#value} characters, expected at least $2" "$3"
    fi
}

# Passwords go into connection URLs unescaped: letters, digits and - . _ ~ only.
url_safe() {
    eval "value=\${$1-}"
    case "$value" in
        *[!A-Za-z0-9._~-]*)
            refuse "$1" "holds characters a connection URL would need escaped (use letters and digits)" "openssl rand -hex 24"
            ;;
    esac
}

fernet='python3 -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
check AIRFLOW_FERNET_KEY 44 "$fernet"
eval "key=\${AIRFLOW_FERNET_KEY-}"
if [ "${#key}" -ge 44 ] && ! printf '%s' "$key" | grep -Eq '^[A-Za-z0-9_-]{43}=$'; then
    refuse AIRFLOW_FERNET_KEY "is not a Fernet key (44 characters of URL-safe base64, ending in =)" "$fernet"
fi
check AIRFLOW_JWT_SECRET 32 "openssl rand -hex 32"
check AIRFLOW_API_SECRET_KEY 32 "openssl rand -hex 32"
for name in AIRFLOW_DB_PASSWORD NIGHTSCORE_DB_PASSWORD; do
    check "$name" 16 "openssl rand -hex 24"
    url_safe "$name"
done
check AIRFLOW_ADMIN_PASSWORD 12 "openssl rand -hex 16"

if [ "$bad" -ne 0 ]; then
    echo "check-secrets: fix .env (see .env.example), then docker compose up -d again" >&2
    exit 1
fi
echo "check-secrets: every secret of .env is set"
