# Sourced by .ci/run (and usable by hand: `. .ci/services.sh`): makes sure the services the tests need
# are there and running, installing them from Debian's packages when missing, and exports where they are.
#
#   PostgreSQL: a local server (Debian's `postgresql`), started if it isn't running, with a role
#               `qwen_gateway` (password `qwen_gateway`, CREATEDB) for the tests; exported as
#               QWEN_GATEWAY_TEST_POSTGRES_URL. Each test creates and drops a database of its own.
#   Chromium:   Debian's `chromium` at /usr/bin/chromium, for the admin console's browser test.
#
# Needs root (apt-get, and starting the cluster as its owner), as CI and the developers' machines are.

_qg_apt_updated=""
_qg_apt_install() {
    if [ -z "$_qg_apt_updated" ]; then
        apt-get update -qq
        _qg_apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

_qg_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null; then
        echo "services: installing PostgreSQL (Debian package postgresql)"
        _qg_apt_install postgresql
    fi
    local version cluster port
    version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
    cluster=$(pg_lsclusters -h | awk -v v="$version" '$1 == v {print $2; exit}')
    if [ -z "$cluster" ]; then
        pg_createcluster "$version" main >/dev/null
        cluster=main
    fi
    port=$(pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {print $3}')
    if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
        echo "services: starting PostgreSQL $version/$cluster on port $port"
        pg_ctlcluster "$version" "$cluster" start
    fi
    local i
    for i in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p "$port" || { echo "services: PostgreSQL did not start" >&2; return 1; }
    # The role the tests log in as: created once, kept (it owns nothing but the tests' own databases).
    su postgres -c "psql -q -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname = 'qwen_gateway'\"" \
        | grep -q 1 \
        || su postgres -c "psql -q -p $port -c \"CREATE ROLE qwen_gateway LOGIN CREATEDB PASSWORD 'qwen_gateway'\""
    export QWEN_GATEWAY_TEST_POSTGRES_URL="postgresql://qwen_gateway:qwen_gateway@127.0.0.1:$port/postgres"
}

_qg_chromium() {
    if ! command -v chromium >/dev/null; then
        echo "services: installing Chromium (Debian package chromium)"
        _qg_apt_install chromium
    fi
}

_qg_started=$(date +%s)
_qg_postgres
_qg_chromium
echo "services: PostgreSQL and Chromium ready in $(( $(date +%s) - _qg_started )) s"
