#!/usr/bin/env bash
# Install, upgrade or remove gpu-router as a systemd service.
#
# Idempotent: a re-run upgrades the code in /opt/gpu-router/venv and the unit, but never
# overwrites an existing /etc/gpu-router/config.yaml (config.yaml.example is always refreshed).
# The whole body lives in main() so a truncated copy of this file cannot half-run.
set -euo pipefail

NAME=gpu-router
# The directory holding this script is the source tree that gets pip-installed.
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ROOT=""
STAGING=no
SYSTEMCTL=auto
VENV=yes
ACTION=install
PURGE=no
BUILD_TMP=""

status() { printf '%s: %s\n' "$NAME" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$NAME" "$*" >&2; }
error() {
    printf '%s: error: %s\n' "$NAME" "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: install.sh [OPTIONS]

Install gpu-router into /opt/$NAME/venv, its unit into /etc/systemd/system and an
example config into /etc/$NAME (an existing config.yaml is never overwritten).

Options:
  --root DIR        stage every file under DIR instead of / (implies --no-systemctl;
                    root is not required). Meant for packaging and tests.
  --no-systemctl    do not run systemctl (daemon-reload, enable, try-restart)
  --systemctl       run systemctl even when staging or when systemd is not detected
  --no-venv         install files only; skip creating the venv and pip install
  --uninstall       disable the service, remove the unit and /opt/$NAME;
                    /etc/$NAME is kept
  --purge           with --uninstall: also remove /etc/$NAME and the state directory
  -h, --help        show this help and exit

Environment:
  PYTHON            interpreter used to create the venv (default: /usr/bin/python3
                    when present, else python3 on PATH). It must not live under /home
                    or /root: the unit sets ProtectHome=yes.
EOF
}

usage_error() {
    printf '%s: %s\n' "$NAME" "$*" >&2
    usage >&2
    exit 2
}

parse_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --root)
                if [ "$#" -lt 2 ] || [ -z "$2" ]; then
                    usage_error "--root needs a directory"
                fi
                ROOT="$2"
                shift
                ;;
            --root=*)
                ROOT="${1#--root=}"
                [ -n "$ROOT" ] || usage_error "--root needs a directory"
                ;;
            --no-systemctl) SYSTEMCTL=no ;;
            --systemctl) SYSTEMCTL=yes ;;
            --no-venv) VENV=no ;;
            --uninstall) ACTION=uninstall ;;
            --purge) PURGE=yes ;;
            -h | --help)
                usage
                exit 0
                ;;
            *) usage_error "unknown option: $1" ;;
        esac
        shift
    done
    if [ "$PURGE" = yes ] && [ "$ACTION" != uninstall ]; then
        usage_error "--purge only makes sense with --uninstall"
    fi
    if [ -n "$ROOT" ]; then
        STAGING=yes
        mkdir -p -- "$ROOT"
        ROOT="$(cd -- "$ROOT" && pwd)"
        # "$ROOT/etc/..." must never collapse onto the live system while staging is assumed.
        [ "$ROOT" != / ] || usage_error "--root / is the live system; run without --root instead"
    fi
}

# systemctl runs only on a systemd-booted host (the sd_booted() test) and never while staging,
# unless forced with --systemctl.
use_systemctl() {
    [ "$SYSTEMCTL" = yes ] && return 0
    [ "$SYSTEMCTL" = no ] && return 1
    [ "$STAGING" = no ] && [ -d /run/systemd/system ]
}

require_root() {
    [ "$STAGING" = yes ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        error "must run as root (try: sudo $0), or use --root DIR to stage into a directory"
    fi
}

default_python() {
    if [ -x /usr/bin/python3 ]; then
        echo /usr/bin/python3
    else
        command -v python3 || error "python3 not found; install it or set PYTHON"
    fi
}

install_venv() {
    local python base venv="$OPT/venv"
    python="${PYTHON:-$(default_python)}"
    base="$("$python" -c 'import sys; print(sys.base_prefix)')" ||
        error "cannot run $python; set PYTHON to a working python3"
    case "$base" in
        /home/* | /root/* | /home | /root)
            warn "$python lives under $base: ProtectHome=yes hides it from the service" \
                "and the venv will not start; use the system python3 (PYTHON=/usr/bin/python3)"
            ;;
    esac
    # Re-running venv on a healthy venv is a no-op that costs an ensurepip; a broken one
    # (its base interpreter gone after an OS upgrade) is rebuilt from scratch.
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        status "creating venv $venv with $python"
        "$python" -m venv --clear "$venv" ||
            error "venv creation failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    # pip builds a local directory in-tree: building from a clean copy keeps root-owned build/
    # and *.egg-info out of the checkout, and modules deleted upstream out of a stale build/lib.
    BUILD_TMP="$(mktemp -d)"
    trap 'rm -rf -- "$BUILD_TMP"' EXIT
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
        --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache --exclude=./.hypothesis \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$BUILD_TMP" -xf -
    status "installing $SRC into $venv"
    # pip reinstalls a local directory even at the same version, so a re-run upgrades the code.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$BUILD_TMP"
    if [ "$STAGING" = yes ]; then
        relocate_venv "$venv"
    fi
}

# A staged tree is copied to / by a package: nothing in it may point into the staging directory.
# pip writes each console script with "#!$ROOT/opt/.../python"; gpu-router's own script becomes a
# launcher that finds its python next to itself (so the tree works wherever it lands, / included),
# and every other script gets the path it will have once installed.
relocate_venv() {
    local venv="$1" script first
    cat >"$venv/bin/$NAME" <<'LAUNCHER'
#!/bin/sh
# gpu-router launcher: runs the python of the venv this file sits in, wherever that venv was copied.
here="$(dirname -- "$(readlink -f -- "$0")")"
exec "$here/python" -m gpu_router "$@"
LAUNCHER
    chmod 0755 "$venv/bin/$NAME"
    for script in "$venv"/bin/*; do
        if [ ! -f "$script" ] || [ -L "$script" ]; then
            continue
        fi
        IFS= read -r first <"$script" || continue
        case "$first" in
            "#!$ROOT/"*) sed -i "1s|^#!$ROOT/|#!/|" "$script" ;;
        esac
    done
    # activate scripts name the venv directory; point them at its final place too.
    sed -i "s|$ROOT/opt/$NAME/venv|/opt/$NAME/venv|g" "$venv"/bin/activate* 2>/dev/null || true
    if grep -rIl --exclude-dir=__pycache__ -F "$ROOT" "$venv/bin" >/dev/null 2>&1; then
        warn "some files in $venv/bin still name the staging directory $ROOT"
    fi
}

do_install() {
    local unit_src="$SRC/systemd/$NAME.service" config_src="$SRC/config/config.yaml"
    [ -f "$unit_src" ] || error "missing $unit_src; run install.sh from the gpu-router source tree"
    [ -f "$config_src" ] || error "missing $config_src; run install.sh from the gpu-router source tree"

    install -d -m 0755 "$OPT" "$ETC" "$UNIT_DIR"
    if [ "$VENV" = yes ]; then
        install_venv
    else
        status "--no-venv: skipping the venv and pip install"
    fi

    install -m 0644 "$unit_src" "$UNIT"
    status "installed $UNIT"
    # Never overwrite the admin's config; the example is refreshed so new keys can be diffed in.
    if [ -e "$ETC/config.yaml" ]; then
        status "keeping existing $ETC/config.yaml"
    else
        install -m 0644 "$config_src" "$ETC/config.yaml"
        status "installed example config as $ETC/config.yaml"
    fi
    install -m 0644 "$config_src" "$ETC/config.yaml.example"

    if use_systemctl; then
        systemctl daemon-reload
        systemctl enable "$NAME.service"
        # Restarts only a running service (an upgrade); a fresh install waits for the edited config.
        systemctl try-restart "$NAME.service"
    else
        status "systemctl skipped (staging, --no-systemctl, or systemd is not running);" \
            "run: systemctl daemon-reload && systemctl enable $NAME.service"
    fi

    cat >&2 <<EOF

Next steps:
  1. Edit the config:   \$EDITOR $ETC/config.yaml
     (compare with $ETC/config.yaml.example after upgrades)
  2. Check it once:     /opt/$NAME/venv/bin/$NAME --config /etc/$NAME/config.yaml --report-only
  3. Start it:          systemctl enable --now $NAME
  4. Follow the logs:   journalctl -u $NAME -f
EOF
}

do_uninstall() {
    if use_systemctl; then
        # Tolerate a unit that is already gone so a second uninstall still succeeds.
        systemctl disable --now "$NAME.service" || warn "systemctl disable --now $NAME.service failed"
    fi
    rm -f -- "$UNIT"
    rm -rf -- "$OPT"
    status "removed $UNIT and $OPT"
    if use_systemctl; then
        systemctl daemon-reload
    fi
    if [ "$PURGE" = yes ]; then
        # DynamicUser keeps StateDirectory under /var/lib/private with a symlink in /var/lib.
        rm -rf -- "$ETC" "$ROOT/var/lib/$NAME" "$ROOT/var/lib/private/$NAME"
        status "purged $ETC and the state directory"
    else
        status "kept $ETC (use --uninstall --purge to remove it)"
    fi
}

main() {
    parse_args "$@"
    require_root
    OPT="$ROOT/opt/$NAME"
    ETC="$ROOT/etc/$NAME"
    UNIT_DIR="$ROOT/etc/systemd/system"
    UNIT="$UNIT_DIR/$NAME.service"
    case "$ACTION" in
        install) do_install ;;
        uninstall) do_uninstall ;;
    esac
}

main "$@"
