#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for sluice's RBD tests and benchmarks.
#
#   scripts/ceph-cluster.sh up DIR     start one mon and one OSD (memstore) on 127.0.0.1,
#                                      everything inside DIR, cephx on, pool `rbd` ready;
#                                      prints the path of DIR/ceph.conf
#   scripts/ceph-cluster.sh down DIR   kill exactly the daemons `up DIR` started
#   scripts/ceph-cluster.sh install    install the Debian packages only (idempotent)
#
# Conf, keyring (mon., client.admin, osd.0), mon store, OSD, logs, admin sockets and pid
# files all live in DIR; nothing goes to /etc/ceph, /var/lib/ceph, /var/log/ceph or
# /run/ceph, so several clusters can run at once. No ceph-mgr: pools, RBD images, snapshots,
# import/export and `rbd bench` work without it. The OSD keeps its data in RAM (memstore,
# capped by CEPH_MEMSTORE_BYTES, default 1 GiB; at 95% full writes hang, so keep test data
# small). The settings below are the ones that made start-up take ~2 s instead of ~9 s and
# kept the cluster inside DIR; ../shared/reference/ceph-single-node.md explains each.
set -euo pipefail

usage() {
    echo "usage: $0 up DIR | down DIR | install" >&2
    exit 2
}

debs=(ceph-mon ceph-osd ceph-common librbd-dev python3-rbd)

install_packages() {
    local missing=() p
    for p in "${debs[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
}

# The state of process PID ("R", "S", "Z", ...), empty if there is none. A daemon that died
# during start-up stays a zombie child of this script, so `kill -0` would still succeed.
proc_state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    echo "${stat%% *}"
}

alive() {
    local s
    s=$(proc_state "$1")
    [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}

# True if PID is a process started for this cluster (its command line names DIR's conf), so
# `down` never kills a process that merely reuses a recorded PID.
ours() {
    local pid=$1 conf=$2 cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *" $conf "* ]]
}

free_port() {
    python3 - <<'EOF'
import random, socket
for _ in range(100):
    port = random.randint(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
EOF
}

write_conf() {
    local dir=$1 fsid=$2 port=$3
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
ms bind retry count = 1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
run dir = $dir/run
crash dir = $dir/crash
exporter sock dir = $dir/run
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon cluster log file = $dir/log/cluster.log
mon data avail crit = 1
mon warn on pool no redundancy = false
client mount timeout = 30
rados mon op timeout = 30

[mon]
mon data = $dir/mon/\$cluster-\$id
paxos propose interval = 0.05
paxos min wait = 0.01

[osd]
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-1073741824}
memstore page set = true
memstore page size = 4096
EOF
}

# Waits until `ceph ...` succeeds and its output matches REGEX, or fails after SECS, or at
# once when the daemon with pid WATCH (if not empty) has died.
wait_for() {
    local secs=$1 regex=$2 what=$3 watch=$4
    shift 4
    local deadline=$((SECONDS + secs)) out
    while :; do
        out=$("$@" 2>/dev/null) && [[ $out =~ $regex ]] && return 0
        if [ -n "$watch" ] && ! alive "$watch"; then
            echo "ceph-cluster: the daemon died before $what" >&2
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            echo "ceph-cluster: $what did not happen within ${secs}s" >&2
            return 1
        fi
        sleep 0.1
    done
}

# Starts a daemon in its own session and records its PID in DIR/pids.
start_daemon() {
    local dir=$1 name=$2
    shift 2
    setsid "$@" >>"$dir/log/$name.out" 2>&1 </dev/null &
    local pid=$!
    echo "$pid $name" >>"$dir/pids"
    echo "$pid"
}

down() {
    local dir=$1 conf pid name left
    dir=$(cd "$dir" 2>/dev/null && pwd) || { echo "ceph-cluster: no directory $1" >&2; return 0; }
    conf="$dir/ceph.conf"
    [ -f "$dir/pids" ] || return 0
    local pids=()
    while read -r pid name; do
        # SIGKILL: a memstore OSD writes its whole store to disk on SIGTERM, and the data is
        # thrown away anyway.
        if alive "$pid" && ours "$pid" "$conf"; then
            kill -KILL "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done <"$dir/pids"
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.02; done
    done
    left=()
    for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
    if [ ${#left[@]} -gt 0 ]; then
        echo "ceph-cluster: still running after SIGKILL: ${left[*]}" >&2
        return 1
    fi
    rm -f "$dir/pids"
}

up() {
    local dir=$1
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ -f "$dir/pids" ]; then
        echo "ceph-cluster: $dir already has a cluster (run: $0 down $dir)" >&2
        exit 1
    fi
    install_packages
    local conf="$dir/ceph.conf" keyring="$dir/keyring"
    rm -rf "$dir/mon" "$dir/osd" "$dir/log" "$dir/run" "$dir/crash"
    mkdir -p "$dir/mon/ceph-a" "$dir/osd/ceph-0" "$dir/log" "$dir/run" "$dir/crash"
    # Anything failing from here on takes down what was started so far.
    trap 'down "$dir" || true' ERR

    local fsid osd_uuid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    rm -f "$keyring"
    ceph-authtool --create-keyring "$keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null

    # The mon's port is picked by test-binding; if another process takes it in between, the
    # mon exits at once (ms bind retry count = 1) and we try another port.
    local attempt port mon
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        write_conf "$dir" "$fsid" "$port"
        rm -rf "$dir/mon/ceph-a" "$dir/monmap" && mkdir -p "$dir/mon/ceph-a"
        monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
        ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$keyring"
        mon=$(start_daemon "$dir" mon.a ceph-mon -c "$conf" -i a -f)
        if wait_for 20 'quorum' "the monitor's quorum" "$mon" \
            ceph -c "$conf" --connect-timeout 2 mon stat; then
            break
        fi
        if alive "$mon"; then
            echo "ceph-cluster: the monitor did not form a quorum; see $dir/log" >&2
            false
        fi
        echo "ceph-cluster: the monitor exited (port $port taken?); trying another port" >&2
        wait "$mon" 2>/dev/null || true
        [ "$attempt" -lt 5 ] || { echo "ceph-cluster: no monitor started; see $dir/log" >&2; false; }
    done

    ceph -c "$conf" --connect-timeout 10 osd new "$osd_uuid" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/osd.0.out" 2>&1
    local osd
    osd=$(start_daemon "$dir" osd.0 ceph-osd -c "$conf" -i 0 -f)
    wait_for 60 '"num_up_osds":1,.*"num_in_osds":1' "osd.0 up and in" "$osd" \
        ceph -c "$conf" --connect-timeout 5 osd stat -f json
    ceph -c "$conf" --connect-timeout 10 osd pool create rbd 8 8 replicated >/dev/null 2>&1
    rbd -c "$conf" pool init rbd
    trap - ERR
    echo "$conf"
}

case "${1:-}" in
    up) [ $# -eq 2 ] || usage; up "$2" ;;
    down) [ $# -eq 2 ] || usage; down "$2" ;;
    install) [ $# -eq 1 ] || usage; install_packages ;;
    *) usage ;;
esac
