#!/usr/bin/env bash
# Installs comfyd system-wide on Debian/Ubuntu (systemd), upgrades it in place, or removes it.
# Run `scripts/install.sh --help` for the options; docs/operations.md for what to do next.
set -euo pipefail

PROG=install.sh
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Where things go (each prefixed with $DESTDIR).
OPT_DIR=/opt/comfyd
VENV_DIR=$OPT_DIR/venv
ETC_DIR=/etc/comfyd
STATE_DIR=/var/lib/comfyd
LOGS_DIR=/var/log/comfyd
OUTPUTS_DIR=/srv/comfyui/output
COMFYUI_HOME=/var/lib/comfyui
UNIT_DIR=/etc/systemd/system
UNITS=(comfyd.service comfyui@.service comfyui.target)

usage() {
    cat <<EOF
Usage: scripts/install.sh [options]

Installs comfyd from this source tree ($SRC_DIR):
  - system users and groups: comfyd (runs comfyd) and comfyui (runs ComfyUI, owns the outputs folder;
    comfyd joins its group). Existing users are kept as they are.
  - folders: $OPT_DIR, $ETC_DIR (root:comfyd 0750), $STATE_DIR and $LOGS_DIR (comfyd 0750),
    $OUTPUTS_DIR (comfyui:comfyui 2775, only when it does not exist yet)
  - a virtualenv at $VENV_DIR with comfyd installed by pip (re-run to upgrade)
  - units comfyd.service, comfyui@.service and comfyui.target in $UNIT_DIR
  - $ETC_DIR/comfyd.toml from config/comfyd.toml, and $ETC_DIR/comfyd.env with a generated
    MANAGEMENT_API_KEY (0640 root:comfyd); both only when absent, so a re-run keeps your settings and key
  - then systemctl daemon-reload and enable --now comfyd.service, when systemd is running

It does not install or build ComfyUI: comfyui@N.service expects your checkout at /opt/comfyui.

Options:
  --uninstall         stop and disable the units, remove them and $OPT_DIR; keep config, data, logs
  --purge             with --uninstall (implied): also remove $ETC_DIR, $STATE_DIR, $LOGS_DIR and the
                      comfyd user. The comfyui user and $OUTPUTS_DIR are never removed.
  --destdir DIR       install under DIR instead of / (same as DESTDIR=DIR): files only; user creation,
                      chown and systemctl are printed instead of run. The venv is built in place, so its
                      scripts point into DIR: use --no-venv when staging a package.
  --no-venv           skip creating the virtualenv and installing comfyd into it
  --pip-args "ARGS"   extra arguments for pip install (or COMFYD_PIP_ARGS), e.g. "--no-deps" or
                      "--no-index --find-links /srv/wheels" for an offline host
  --python PATH       interpreter for the venv (or PYTHON=; default /usr/bin/python3, needs >= 3.11
                      and python3-venv). It must not live under /home, /root or /tmp: the service
                      cannot see those (ProtectHome=, PrivateTmp=).
  --no-start          install and enable, but do not start comfyd now
  --restart           restart comfyd if it is running, to switch to the version just installed
                      (running jobs drain first; queued jobs are kept)
  -h, --help          show this help

Examples:
  sudo scripts/install.sh                     install, or upgrade in place
  sudo scripts/install.sh --restart           upgrade and switch to the new version now
  DESTDIR=/tmp/root scripts/install.sh --no-venv
  sudo scripts/install.sh --uninstall --purge
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*"; }
step() { printf '==> %s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# --- options ------------------------------------------------------------------------------------------------
MODE=install
PURGE=0
WITH_VENV=1
START=1
RESTART=0
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-}
PIP_ARGS=${COMFYD_PIP_ARGS:-}

while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --uninstall) MODE=uninstall ;;
        --purge) MODE=uninstall; PURGE=1 ;;
        --destdir) (($# >= 2)) || die "--destdir needs a directory"; DESTDIR=$2; shift ;;
        --destdir=*) DESTDIR=${1#*=} ;;
        --no-venv) WITH_VENV=0 ;;
        --pip-args) (($# >= 2)) || die "--pip-args needs a value"; PIP_ARGS=$2; shift ;;
        --pip-args=*) PIP_ARGS=${1#*=} ;;
        --python) (($# >= 2)) || die "--python needs a path"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --no-start) START=0 ;;
        --restart) RESTART=1 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done

# DESTDIR: absolute, without a trailing slash; "/" means the real system.
if [[ -n $DESTDIR ]]; then
    [[ $DESTDIR == /* ]] || DESTDIR=$PWD/$DESTDIR
    DESTDIR=${DESTDIR%/}
fi
staged() { [[ -n $DESTDIR ]]; }
d() { printf '%s%s' "$DESTDIR" "$1"; }

# System changes that make no sense inside a DESTDIR are printed there instead of run.
sys_run() {
    if staged; then
        printf 'would run: %s\n' "$*"
    else
        "$@"
    fi
}
own() { sys_run chown "$@"; }
systemd_running() { [[ -d /run/systemd/system ]]; }

# --- users, folders -----------------------------------------------------------------------------------------
ensure_group() {
    local group=$1
    if staged; then
        printf 'would run: groupadd --system %s   (if missing)\n' "$group"
    elif ! getent group "$group" >/dev/null; then
        groupadd --system "$group"
        log "created system group $group"
    fi
}

ensure_user() {
    local user=$1 home=$2 comment=$3
    if staged; then
        printf 'would run: useradd --system --gid %s --home-dir %s --no-create-home --shell /usr/sbin/nologin %s   (if missing)\n' \
            "$user" "$home" "$user"
    elif ! getent passwd "$user" >/dev/null; then
        useradd --system --gid "$user" --home-dir "$home" --no-create-home \
            --shell /usr/sbin/nologin --comment "$comment" "$user"
        log "created system user $user (home $home)"
    fi
}

ensure_member() {
    local user=$1 group=$2
    if staged; then
        printf 'would run: usermod --append --groups %s %s   (if not a member)\n' "$group" "$user"
    elif [[ " $(id -nG "$user") " != *" $group "* ]]; then
        usermod --append --groups "$group" "$user"
        log "added $user to group $group"
    fi
}

# make_dir MODE OWNER:GROUP PATH: create (or re-assert) one of comfyd's own folders.
make_dir() {
    local mode=$1 owner=$2 path
    path=$(d "$3")
    mkdir -p "$path"
    chmod "$mode" "$path"
    own "$owner" "$path"
}

# --- pieces of the install ----------------------------------------------------------------------------------
check_prerequisites() {
    if ! staged; then
        [[ $(id -u) -eq 0 ]] || die "run as root (sudo $0), or stage into a directory with DESTDIR=DIR"
        command -v useradd >/dev/null || die "useradd not found (Debian/Ubuntu: apt-get install passwd)"
    fi
    [[ -f $SRC_DIR/pyproject.toml && -d $SRC_DIR/comfyd ]] || die "$SRC_DIR is not a comfyd source tree"
    for unit in "${UNITS[@]}"; do
        [[ -f $SRC_DIR/systemd/$unit ]] || die "missing $SRC_DIR/systemd/$unit"
    done
    ((WITH_VENV)) || return 0
    if [[ -z $PYTHON ]]; then
        PYTHON=/usr/bin/python3
        [[ -x $PYTHON ]] || PYTHON=$(command -v python3 || true)
    fi
    if [[ -z $PYTHON ]] || ! command -v "$PYTHON" >/dev/null; then
        die "python3 not found (Debian/Ubuntu: apt-get install python3 python3-venv)"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); comfyd needs >= 3.11 (use --python)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON cannot create virtualenvs (Debian/Ubuntu: apt-get install python3-venv)"
    local real
    real=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')
    case $real in
        /home/* | /root/* | /run/user/* | /tmp/* | /var/tmp/*)
            if staged; then
                warn "the venv's interpreter $real would be invisible to comfyd.service (ProtectHome/PrivateTmp)"
            else
                die "the venv's interpreter $real lives where comfyd.service cannot see it (ProtectHome=, PrivateTmp=): use a system Python, e.g. --python /usr/bin/python3"
            fi
            ;;
    esac
}

install_accounts() {
    step "users and groups"
    ensure_group comfyui
    ensure_user comfyui "$COMFYUI_HOME" "ComfyUI servers (comfyui@N.service)"
    ensure_group comfyd
    ensure_user comfyd "$STATE_DIR" "comfyd job service"
    # Belt and braces with SupplementaryGroups=comfyui in comfyd.service: also lets `sudo -u comfyd` read outputs.
    ensure_member comfyd comfyui
}

install_folders() {
    step "folders"
    make_dir 0755 root:root "$OPT_DIR"
    make_dir 0750 root:comfyd "$ETC_DIR"
    make_dir 0750 comfyd:comfyd "$STATE_DIR"
    make_dir 0750 comfyd:comfyd "$LOGS_DIR"
    local outputs
    outputs=$(d "$OUTPUTS_DIR")
    if [[ -d $outputs ]]; then
        log "kept $OUTPUTS_DIR as it is (comfyd needs rwx on it, via the comfyui group)"
    else
        mkdir -p "$(dirname "$outputs")"
        mkdir "$outputs"
        chmod 2775 "$outputs"
        own comfyui:comfyui "$outputs"
        log "created $OUTPUTS_DIR (comfyui:comfyui, 2775: new files keep the comfyui group)"
    fi
}

install_venv() {
    if ((!WITH_VENV)); then
        step "virtualenv: skipped (--no-venv)"
        return
    fi
    step "virtualenv $VENV_DIR"
    local venv
    venv=$(d "$VENV_DIR")
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c '' 2>/dev/null; then
        log "reusing $VENV_DIR"
    else
        if [[ -e $venv ]]; then
            log "recreating $VENV_DIR (its interpreter no longer runs)"
        fi
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
    fi
    # Build from a copy: pip's in-tree build would leave build/ and *.egg-info, owned by root, in the checkout.
    local build
    build=$(mktemp -d "${TMPDIR:-/tmp}/comfyd-build.XXXXXX")
    # shellcheck disable=SC2064 # expand $build now: it is local
    trap "rm -rf '$build'" EXIT
    local item
    for item in pyproject.toml setup.py setup.cfg MANIFEST.in README.md LICENSE comfyd; do
        if [[ -e $SRC_DIR/$item ]]; then
            cp -R "$SRC_DIR/$item" "$build/"
        fi
    done
    find "$build" -name __pycache__ -type d -prune -exec rm -rf {} +
    local -a pip_args=()
    if [[ -n $PIP_ARGS ]]; then
        read -r -a pip_args <<<"$PIP_ARGS"
    fi
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
        ${pip_args[@]+"${pip_args[@]}"} "$build"
    rm -rf "$build"
    trap - EXIT
    [[ -x $venv/bin/comfyd ]] || die "pip finished but $VENV_DIR/bin/comfyd is missing"
    log "installed comfyd $("$venv/bin/python" -c 'from importlib.metadata import version; print(version("comfyd"))')"
    if [[ -d $SRC_DIR/docs ]]; then
        mkdir -p "$(d "$OPT_DIR/docs")"
        find "$SRC_DIR/docs" -maxdepth 1 -name '*.md' -exec install -m 0644 -t "$(d "$OPT_DIR/docs")" {} +
    fi
}

new_key() {
    "${PYTHON:-python3}" -c 'import secrets; print(secrets.token_urlsafe(32))' 2>/dev/null \
        || od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}

install_config() {
    step "configuration $ETC_DIR"
    local toml env tmp
    toml=$(d "$ETC_DIR/comfyd.toml")
    if [[ -e $toml ]]; then
        log "kept $ETC_DIR/comfyd.toml"
    else
        tmp=$(mktemp "$(d "$ETC_DIR")/.comfyd.toml.XXXXXX")
        if [[ -f $SRC_DIR/config/comfyd.toml ]]; then
            cat "$SRC_DIR/config/comfyd.toml" >"$tmp"
        else
            printf '# comfyd configuration: see docs/configuration.md. Empty = built-in defaults.\n' >"$tmp"
        fi
        chmod 0640 "$tmp"
        mv "$tmp" "$toml"
        own root:comfyd "$toml"
        log "wrote $ETC_DIR/comfyd.toml"
    fi

    env=$(d "$ETC_DIR/comfyd.env")
    if [[ -e $env ]]; then
        log "kept $ETC_DIR/comfyd.env and its API key"
    else
        tmp=$(mktemp "$(d "$ETC_DIR")/.comfyd.env.XXXXXX") # created 0600: the key is never readable by others
        cat >"$tmp" <<EOF
# comfyd's environment, read by systemd (EnvironmentFile= in comfyd.service). These settings override
# /etc/comfyd/comfyd.toml. Written by scripts/install.sh on $(date -u +%Y-%m-%d), which never overwrites it.
# After a change: systemctl restart comfyd

# API key(s) clients send as X-API-Key. Comma-separated: to rotate, add the new key, move the clients over,
# then remove the old one.
MANAGEMENT_API_KEY=$(new_key)

# ComfyUI's output folder, shared with the comfyui@N services.
COMFYUI_OUTPUTS=$OUTPUTS_DIR

# Backends, when not listed in comfyd.toml: comma-separated; comfyui@N listens on port 8188+N.
#COMFYUI_API_URL=http://127.0.0.1:8188,http://127.0.0.1:8189
#COMFYUI_MODELS=/opt/comfyui/models
EOF
        chmod 0640 "$tmp"
        mv "$tmp" "$env"
        own root:comfyd "$env"
        log "wrote $ETC_DIR/comfyd.env with a new MANAGEMENT_API_KEY (read it: sudo grep KEY $ETC_DIR/comfyd.env)"
    fi
}

UNITS_CHANGED=0
install_units() {
    step "systemd units $UNIT_DIR"
    mkdir -p "$(d "$UNIT_DIR")"
    local unit dst
    for unit in "${UNITS[@]}"; do
        dst=$(d "$UNIT_DIR/$unit")
        if [[ -f $dst ]] && cmp -s "$SRC_DIR/systemd/$unit" "$dst"; then
            log "unchanged $unit"
        else
            install -m 0644 "$SRC_DIR/systemd/$unit" "$dst"
            UNITS_CHANGED=1
            log "installed $unit"
        fi
    done
}

activate() {
    step "systemd"
    local exe
    exe=$(d "$VENV_DIR/bin/comfyd")
    if staged; then
        sys_run systemctl daemon-reload
        if ((START)); then
            sys_run systemctl enable --now comfyd.service
        else
            sys_run systemctl enable comfyd.service
        fi
        return
    fi
    if ! systemd_running; then
        # Enabling works offline (it only makes symlinks), e.g. in a chroot or an image build.
        systemctl enable comfyd.service
        log "systemd is not running here: comfyd.service is enabled and starts at the next boot"
        return
    fi
    if ((UNITS_CHANGED)); then
        systemctl daemon-reload
    fi
    if [[ ! -x $exe ]]; then
        systemctl enable comfyd.service
        warn "$VENV_DIR/bin/comfyd does not exist (--no-venv?): comfyd.service is enabled but not started"
        return
    fi
    local was_active=0
    systemctl is-active --quiet comfyd.service && was_active=1
    if ((!START)); then
        systemctl enable comfyd.service
    elif ((was_active && RESTART)); then
        systemctl enable comfyd.service
        log "restarting comfyd (running jobs drain first, queued jobs are kept)"
        systemctl restart comfyd.service
    else
        systemctl enable --now comfyd.service
        if ((was_active)); then
            log "comfyd keeps running the code it started with: systemctl restart comfyd to switch (or re-run with --restart)"
        fi
    fi
    systemctl --no-pager --lines=0 status comfyd.service || true
}

do_install() {
    check_prerequisites
    staged && log "staging into DESTDIR=$DESTDIR (no users, ownership or systemctl changes)"
    install_accounts
    install_folders
    install_venv
    install_config
    install_units
    activate
    cat <<EOF

comfyd is installed.
  status:    systemctl status comfyd; logs: journalctl -u comfyd -f
  API key:   sudo grep MANAGEMENT_API_KEY $ETC_DIR/comfyd.env
  settings:  $ETC_DIR/comfyd.toml (docs/configuration.md), then systemctl restart comfyd
  ComfyUI:   one server per GPU, from your checkout in /opt/comfyui:
             systemctl enable --now comfyui.target comfyui@0.service   (GPU N listens on 8188+N)
EOF
}

# --- uninstall ----------------------------------------------------------------------------------------------
do_uninstall() {
    if ! staged; then
        [[ $(id -u) -eq 0 ]] || die "run as root (sudo $0 --uninstall)"
    fi
    step "stopping and disabling units"
    if staged; then
        sys_run systemctl disable --now comfyd.service comfyui.target
        sys_run systemctl stop 'comfyui@*.service'
    elif systemd_running; then
        systemctl disable --now comfyd.service comfyui.target 2>/dev/null || true
        systemctl stop 'comfyui@*.service' 2>/dev/null || true
    elif command -v systemctl >/dev/null; then
        systemctl disable comfyd.service comfyui.target 2>/dev/null || true
    fi
    local units
    units=$(d "$UNIT_DIR")
    # Instance links (comfyui@N) live only in comfyui.target.wants; remove whatever systemctl left.
    rm -rf "$units/comfyui.target.wants"
    rm -f "$units/multi-user.target.wants/comfyd.service" "$units/multi-user.target.wants/comfyui.target"
    local unit
    for unit in "${UNITS[@]}"; do
        if [[ -e $units/$unit ]]; then
            rm -f "$units/$unit"
            log "removed $UNIT_DIR/$unit"
        fi
    done
    if ((PURGE)); then
        rm -rf "$units/comfyd.service.d" "$units/comfyui@.service.d" "$units/comfyui.target.d"
    fi
    if staged; then
        sys_run systemctl daemon-reload
    elif systemd_running; then
        systemctl daemon-reload
    fi

    step "removing $OPT_DIR"
    rm -rf "$(d "$OPT_DIR")"

    if ((PURGE)); then
        step "purging configuration, data and logs"
        rm -rf "$(d "$ETC_DIR")" "$(d "$STATE_DIR")" "$(d "$LOGS_DIR")"
        log "removed $ETC_DIR, $STATE_DIR, $LOGS_DIR"
        if staged; then
            sys_run userdel comfyd
        elif getent passwd comfyd >/dev/null; then
            userdel comfyd
            if getent group comfyd >/dev/null; then
                groupdel comfyd
            fi
            log "removed user comfyd"
        fi
        log "kept the comfyui user and $OUTPUTS_DIR (ComfyUI's)"
    else
        log "kept $ETC_DIR (config, API key), $STATE_DIR (database), $LOGS_DIR and $OUTPUTS_DIR; --purge removes comfyd's"
    fi
    log "comfyd is uninstalled"
}

case $MODE in
    install) do_install ;;
    uninstall) do_uninstall ;;
esac
