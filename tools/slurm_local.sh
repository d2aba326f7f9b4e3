#!/usr/bin/env bash
# One-node local Slurm cluster (munge + MariaDB + slurmdbd + slurmctld + slurmd)
# for tests and single-machine users, so that `dora grid` / submitit work here.
#
# Usage: tools/slurm_local.sh start|stop|status|install|clean
#   install only install the packages if missing (apt-get); idempotent.
#   start   install the Debian/Ubuntu packages if missing, write the config and
#           start the daemons; waits until the node is idle; idempotent.
#   stop    cancel our jobs, stop the daemons by their pid files, verify that
#           none of our processes remain; idempotent.
#   status  daemons (running or not), sinfo and squeue; exit 3 unless all run.
#   clean   stop, then delete the whole folder (config, state, logs, database).
#
# Everything (config, state, logs, pid files, munge key, database) lives in
# $SLURM_LOCAL_DIR (default /tmp/demucs-lora-slurm). After `start`, run
#   source $SLURM_LOCAL_DIR/env.sh      (or the printed `export SLURM_CONF=...`)
# then sbatch/squeue/sacct/submitit/dora use this cluster (partition `local`).
#
# Environment knobs:
#   SLURM_LOCAL_DIR        state folder (default /tmp/demucs-lora-slurm)
#   SLURM_LOCAL_PORT_BASE  first of 4 TCP ports on 127.0.0.1 (default 6817:
#                          slurmctld, slurmd, slurmdbd, mariadb = base+0..3)
#   SLURM_LOCAL_TIMEOUT    seconds to wait for each daemon / the idle node (60)
#   SLURM_LOCAL_NO_INSTALL=1  never call apt-get (fail if packages are missing)
# Needs root (daemons run as root, munged as `munge`, mariadbd as `mysql`).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/demucs-lora-slurm}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CLUSTER=demucslocal
PARTITION=local

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
MYSQL_PORT=$((PORT_BASE + 3))

ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
STATE=$DIR/state
MUNGE_DIR=$DIR/munge
MUNGE_SOCK=$MUNGE_DIR/run/munge.socket
MYSQL_DIR=$DIR/mysql
MYSQL_SOCK=$MYSQL_DIR/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf

SBIN=/usr/sbin
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
# daemon name -> pid file; start order is munged mariadbd slurmdbd slurmctld slurmd
declare -A PIDFILE=(
    [munged]=$MUNGE_DIR/run/munged.pid
    [mariadbd]=$MYSQL_DIR/mariadbd.pid
    [slurmdbd]=$RUN/slurmdbd.pid
    [slurmctld]=$RUN/slurmctld.pid
    [slurmd]=$RUN/slurmd.pid
)
START_ORDER=(munged mariadbd slurmdbd slurmctld slurmd)
STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged)
OUR_COMMS='^(munged|mariadbd|mysqld|slurmdbd|slurmctld|slurmd|slurmstepd)$'

short_host() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }
log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons as root/munge/mysql); try: sudo $0 $*"
}

# ---------------------------------------------------------------- processes
pid_of() {  # print the live pid of daemon $1 (pid file + matching comm), else fail
    local f=${PIDFILE[$1]} pid comm
    [ -s "$f" ] || return 1
    pid=$(tr -dc 0-9 < "$f")
    [ -n "$pid" ] && alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    case "$1" in
        mariadbd) [[ $comm == mariadbd || $comm == mysqld ]] ;;
        *) [ "$comm" = "$1" ] ;;
    esac || return 1
    echo "$pid"
}
running() { pid_of "$1" >/dev/null; }

alive() {  # pid exists and is not a zombie
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [ "${st%% *}" != Z ]
}

ancestors() {  # this script and its parents: never to be killed
    local p=$$ st
    while [ -n "$p" ] && [ "$p" -gt 1 ]; do
        echo "$p"
        st=$(cat "/proc/$p/stat" 2>/dev/null) || break
        st=${st##*) }
        p=$(cut -d' ' -f2 <<<"$st")
    done
}

our_pids() {  # every slurm/munge/mariadb daemon of $DIR, and every job process of its cluster
    local p pid comm env keep
    keep=" $(ancestors | tr '\n' ' ') "
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $keep == *" $pid "* ]] && continue
        alive "$pid" || continue
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        env=$(tr '\0' '\n' 2>/dev/null < "$p/environ") || env=
        if [[ $comm =~ $OUR_COMMS ]]; then
            # (no pipes into grep -q: with pipefail a SIGPIPE would read as "no match")
            if grep -qaF -- "$DIR/" "$p/cmdline" 2>/dev/null ||
               grep -qxF -- "SLURM_CONF=$SLURM_CONF" <<<"$env"; then
                echo "$pid"
            fi
        elif grep -qxF -- "SLURM_CONF=$SLURM_CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            echo "$pid"  # a job's process orphaned by a crashed slurmstepd
        fi
    done
}

wait_for() {  # wait_for DESCRIPTION LOGFILE CMD...: poll CMD until it succeeds
    local what=$1 logf=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS - t0 >= TIMEOUT )); then
            log "timed out after ${TIMEOUT}s waiting for $what"
            if [ -f "$logf" ]; then
                echo "----- last lines of $logf -----" >&2
                tail -n 30 "$logf" >&2
                echo "-------------------------------" >&2
            fi
            die "$what did not come up (logs in $LOG)"
        fi
        sleep 0.3
    done
}

# ---------------------------------------------------------------- install
install_packages() {
    local missing=() b
    for b in slurmctld slurmd slurmdbd munged mariadbd; do
        [ -x "$SBIN/$b" ] || command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    for b in sbatch sacct sacctmgr sinfo munge mariadb-install-db; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [ ${#missing[@]} = 0 ] && return 0
    [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && die "missing ${missing[*]} and SLURM_LOCAL_NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${missing[*]}; install ${PACKAGES[*]} (no apt-get here)"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local t0=$SECONDS policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e $policy ]; then
        # keep the packages' own system services from starting on install
        printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local ok=0
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q >&2 || true
    fi
    if apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
        ok=1
    elif apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
        ok=1
    fi
    [ $made_policy = 1 ] && rm -f $policy
    [ $ok = 1 ] || die "apt-get install ${PACKAGES[*]} failed"
    log "installed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- config
node_line() {  # NodeName=... CPUs=... RealMemory=90% of slurmd -C
    local host=$1 hw mem
    hw=$($SBIN/slurmd -C 2>/dev/null | grep -m1 '^NodeName=' || true)
    if [ -z "$hw" ]; then
        hw="NodeName=$host CPUs=$(nproc) RealMemory=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))"
    fi
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    hw=$(sed -e "s/^NodeName=[^ ]*/NodeName=$host/" -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$hw")
    echo "$hw NodeAddr=127.0.0.1 State=UNKNOWN"
}

write_config() {
    local host cpus nl mem defmem
    host=$(short_host)
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd" "$MUNGE_DIR"/{etc,lib,run,log} "$MYSQL_DIR"
    chmod 755 "$DIR" "$ETC" "$RUN" "$LOG"
    # munge: key + its dirs owned by the munge user, nothing group/world-writable
    chown -R munge:munge "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR/etc" "$MUNGE_DIR/lib" "$MUNGE_DIR/log"
    chmod 755 "$MUNGE_DIR" "$MUNGE_DIR/run"
    if [ ! -s "$MUNGE_DIR/etc/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/etc/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/etc/munge.key"
    chmod 400 "$MUNGE_DIR/etc/munge.key"
    if [ ! -s "$ETC/dbpass" ]; then
        (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$ETC/dbpass")
    fi
    nl=$(node_line "$host")
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$nl")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$nl")
    defmem=$(( mem / cpus )); (( defmem > 1024 )) && defmem=1024
    cat > "$ETC/slurm.conf.new" <<EOF
# Generated by tools/slurm_local.sh -- one-node local cluster; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
EnforcePartLimits=ALL
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections this is the munge socket (AuthInfo alone is not used there)
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
MailProg=/bin/true
$nl
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
    : > "$ETC/plugstack.conf"
    chmod 644 "$ETC/slurm.conf" "$ETC/plugstack.conf"
    (umask 077; cat > "$ETC/slurmdbd.conf" <<EOF
# Generated by tools/slurm_local.sh; must sit beside slurm.conf, mode 600.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=${PIDFILE[slurmdbd]}
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/dbpass")
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$ETC/slurmdbd.conf"
    cat > "$DIR/env.sh" <<EOF
# source this file to talk to the local Slurm cluster in $DIR
export SLURM_CONF=$SLURM_CONF
EOF
}

# ---------------------------------------------------------------- daemons
# shellcheck disable=SC2120  # called with -e ... through wait_for
mysql_root() { mariadb --no-defaults --protocol=socket -S "$MYSQL_SOCK" -u root "$@"; }

start_munged() {
    # -f: the pid file/socket live under /tmp, which munged would otherwise reject
    runuser -u munge -- "$SBIN/munged" -f \
        --key-file="$MUNGE_DIR/etc/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="${PIDFILE[munged]}" --log-file="$MUNGE_DIR/log/munged.log" \
        --seed-file="$MUNGE_DIR/lib/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1
    wait_for munged "$MUNGE_DIR/log/munged.log" bash -c "munge --socket='$MUNGE_SOCK' -n | unmunge --socket='$MUNGE_SOCK'"
}

start_mariadbd() {
    if [ ! -d "$MYSQL_DIR/data/mysql" ]; then
        log "initialising MariaDB data dir"
        rm -rf "$MYSQL_DIR/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || { tail -n 30 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    chown -R mysql:mysql "$MYSQL_DIR"
    setsid "$(command -v mariadbd || echo $SBIN/mariadbd)" --no-defaults --user=mysql \
        --datadir="$MYSQL_DIR/data" --socket="$MYSQL_SOCK" --pid-file="${PIDFILE[mariadbd]}" \
        --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$MYSQL_DIR/mariadb.log" --innodb-buffer-pool-size=256M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 </dev/null >>"$LOG/mariadb.out" 2>&1 &
    wait_for mariadbd "$MYSQL_DIR/mariadb.log" mysql_root -e 'SELECT 1'
}

ensure_db_user() {
    local pw
    pw=$(cat "$ETC/dbpass")
    mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    "$SBIN/slurmdbd" </dev/null >>"$LOG/slurmdbd.out" 2>&1
    wait_for slurmdbd "$LOG/slurmdbd.log" sacctmgr -n -P list cluster format=cluster
    local clusters
    clusters=$(sacctmgr -n -P list cluster format=cluster 2>/dev/null || true)
    if ! grep -qx "$CLUSTER" <<<"$clusters"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    "$SBIN/slurmctld" </dev/null >>"$LOG/slurmctld.out" 2>&1
    wait_for slurmctld "$LOG/slurmctld.log" scontrol ping
}

start_slurmd() {
    "$SBIN/slurmd" </dev/null >>"$LOG/slurmd.out" 2>&1
}

node_state() { sinfo -h -N -p "$PARTITION" -o %t 2>/dev/null | head -n1; }

wait_node_idle() {
    local t0=$SECONDS st resumed=0
    while :; do
        st=$(node_state || true)
        case "$st" in
            idle|mix|alloc|comp) return 0 ;;
            down*|drain*|drng*)
                if [ $resumed = 0 ] && running slurmd; then
                    scontrol update nodename="$(short_host)" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        local dead=""
        if (( SECONDS - t0 >= 3 )); then
            running slurmctld || dead+=" slurmctld"
            running slurmd || dead+=" slurmd"
        fi
        if [ -n "$dead" ] || (( SECONDS - t0 >= TIMEOUT )); then
            if [ -n "$dead" ]; then log "daemon(s) exited:$dead"; else log "node state after ${TIMEOUT}s: '${st:-?}'"; fi
            sinfo -N -l >&2 || true
            local f
            for f in slurmd slurmctld; do
                echo "----- last lines of $LOG/$f.log -----" >&2
                tail -n 20 "$LOG/$f.log" >&2 2>/dev/null || true
            done
            die "the node did not become idle (logs in $LOG; \`$0 stop\` cleans up)"
        fi
        sleep 0.3
    done
}

cmd_start() {
    need_root start
    local t0=$SECONDS d
    install_packages
    local all=1
    for d in "${START_ORDER[@]}"; do running "$d" || all=0; done
    if [ $all = 0 ]; then
        write_config
        for d in "${START_ORDER[@]}"; do
            if running "$d"; then
                log "$d already running (pid $(pid_of "$d"))"
                [ "$d" = mariadbd ] && ensure_db_user
            else
                log "starting $d"
                "start_$d"
                [ "$d" = mariadbd ] && ensure_db_user
            fi
        done
    else
        log "all daemons already running"
    fi
    wait_node_idle
    log "cluster up in $((SECONDS - t0))s: partition '$PARTITION', node $(short_host) ($(node_state))"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------- stop
kill_wait() {  # kill_wait SIGNAL SECONDS PID...: signal, then wait until all gone
    local sig=$1 secs=$2 p any t0=$SECONDS
    shift 2
    [ $# = 0 ] && return 0
    kill -s "$sig" "$@" 2>/dev/null || true
    while :; do
        any=0
        for p in "$@"; do alive "$p" && any=1; done
        [ $any = 0 ] && return 0
        (( SECONDS - t0 >= secs )) && return 1
        sleep 0.2
    done
}

cmd_stop() {
    need_root stop
    local d pid left
    if running slurmctld; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local t0=$SECONDS
            while [ -n "$(squeue -h -t R,CG,PD -o %A 2>/dev/null)" ] && (( SECONDS - t0 < 15 )); do sleep 0.3; done
        fi
    fi
    for d in "${STOP_ORDER[@]}"; do
        if pid=$(pid_of "$d"); then
            log "stopping $d (pid $pid)"
            kill_wait TERM 30 "$pid" || { log "$d did not exit, killing"; kill_wait KILL 5 "$pid" || true; }
        fi
        rm -f "${PIDFILE[$d]}"
    done
    # leftovers (slurmstepd + job processes after a crash, daemons whose pid file was lost)
    left=$(our_pids | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
        log "killing leftover processes: $left"
        # shellcheck disable=SC2086
        kill_wait TERM 3 $left || kill_wait KILL 5 $left || true
    fi
    left=$(our_pids | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
        ps -o pid,user,comm,args -p "${left// /,}" >&2 || true
        die "processes still alive after stop: $left"
    fi
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$MYSQL_SOCK"
    log "stopped; no slurm/munge/mariadb process of $DIR remains"
}

# ---------------------------------------------------------------- status
cmd_status() {
    local d rc=0
    echo "SLURM_LOCAL_DIR=$DIR"
    echo "export SLURM_CONF=$SLURM_CONF"
    for d in "${START_ORDER[@]}"; do
        if pid=$(pid_of "$d"); then
            printf '  %-10s running (pid %s)\n' "$d" "$pid"
        else
            printf '  %-10s stopped\n' "$d"
            rc=3
        fi
    done
    if running slurmctld && command -v sinfo >/dev/null; then
        echo "--- sinfo"
        sinfo -N -l || true
        echo "--- squeue"
        squeue || true
    fi
    return $rc
}

cmd_clean() {
    cmd_stop
    case "$DIR" in /|/tmp|/root|/home|"") die "refusing to delete $DIR" ;; esac
    rm -rf "$DIR"
    log "removed $DIR"
}

case "${1:-}" in
    start) cmd_start ;;
    install) need_root install; install_packages ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    clean) cmd_clean ;;
    *) echo "usage: $0 start|stop|status|install|clean   (state in \$SLURM_LOCAL_DIR, default /tmp/demucs-lora-slurm)" >&2; exit 2 ;;
esac
