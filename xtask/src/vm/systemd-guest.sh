#!/bin/bash
# `cargo xtask vm-test --systemd`, in the guest: run by varta-vmtest.service once systemd
# (PID 1) has brought the system up. It installs the daemon and deploy/systemd exactly as
# the README says (install.sh holds the README's own commands), acts, and prints what it
# saw as `@@vm:<tag> key=value ...` lines on the console; the host judges them
# (xtask/src/vm/systemd.rs). It never sleeps a fixed time to let something happen: it
# waits for the journal or the unit's state, with a deadline.
set -u
exec >/dev/ttyS0 2>&1
cd /opt/varta

mark() { echo "@@vm:$*"; }
# Journal lines of the observer's unit (its own logs and PID 1's about it), with the
# monotonic time, which the host compares.
ujournal() { journalctl -q --no-pager -o short-monotonic -u "$1"; }
prop() { systemctl show -p "$2" --value "$1"; }
# wait_for SECONDS COMMAND...: until COMMAND succeeds, at most SECONDS.
wait_for() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}
in_journal() { ujournal "$1" | grep -q -- "$2"; }
# GET a path of the observer's HTTP port (bash's /dev/tcp: no curl in the guest).
http() {
    exec 3<>/dev/tcp/127.0.0.1/9100 || return 1
    printf 'GET %s HTTP/1.0\r\nHost: vm\r\n\r\n' "$1" >&3
    sed '1,/^\r$/d' <&3
    exec 3<&-
}
dump() { # dump TAG UNIT PATTERN: matching journal lines of UNIT, one marker each
    ujournal "$2" | grep -E -- "$3" | sed "s/^/@@vm:$1 /"
}
finish() {
    mark end
    sync
    systemctl poweroff -ff
}
trap finish EXIT

mark begin systemd="$(systemctl --version | awk 'NR==1 {print $2}')" kernel="$(uname -r)"
# PID 1 logs every notification it receives (READY=1, WATCHDOG=1, STOPPING=1) at debug.
systemctl log-level debug

# 1. Install as the README says; `systemctl enable --now` returns once READY=1 arrived.
bash -ex install.sh >/tmp/install.log 2>&1
mark install rc=$?
sed 's/^/@@vm:install-log /' /tmp/install.log
pid=$(prop varta-watch MainPID)
mark unit-file same="$(cmp -s /etc/systemd/system/varta-watch.service deploy/systemd/varta-watch.service && echo yes || echo no)"
mark active state="$(systemctl is-active varta-watch)" pid="$pid"
mark ready-line "$(ujournal varta-watch | grep -m1 'event=ready')"
dump notify varta-watch "Got notification message from PID $pid .*READY=1"
# The sandbox as the kernel applies it to the running daemon.
mark sandbox $(grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' "/proc/$pid/status" | tr -d '\t' | sed 's/:/=/') \
    root_mount="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | tail -1)" \
    etc_writable="$(nsenter -t "$pid" -m sh -c 'touch /etc/varta-probe 2>/dev/null && echo yes || echo no')" \
    tmp_inode="$(stat -c %i /tmp)" unit_tmp_inode="$(nsenter -t "$pid" -m stat -c %i /tmp)"
mark readyz body="$(http /readyz | tr -d '\n')"

# 2. An agent in a unit of its own, under a dynamic user: tracked with its unit's name.
cat >/etc/systemd/system/varta-agent.service <<'EOF'
[Unit]
Description=a VLP agent under a dynamic user
[Service]
DynamicUser=yes
ExecStart=/usr/local/bin/varta-watch agent --socket /run/varta/varta.sock --interval-ms 500
EOF
systemctl daemon-reload
systemctl start varta-agent
apid=$(prop varta-agent MainPID)
wait_for 30 in_journal varta-watch "event=agent_new.* pid=$apid "
mark agent pid="$apid" uid="$(awk '/^Uid:/ {print $2}' "/proc/$apid/status")"
mark agent-line "$(ujournal varta-watch | grep -m1 "event=agent_new.* pid=$apid ")"
mark agent-info "$(http /metrics | grep "^varta_agent_info{pid=\"$apid\"" | tr '"' "'")"

# 3. A threshold change applied by `systemctl reload` (SIGHUP): the next stall comes after
#    the new threshold, not the old one.
old=$(sed -n 's/^threshold-ms = //p' /etc/varta/varta.toml)
sed -i 's/^threshold-ms = .*/threshold-ms = 2500/' /etc/varta/varta.toml
systemctl reload varta-watch
rc=$?
wait_for 20 in_journal varta-watch "event=reload "
mark reload rc=$rc old="$old" new=2500
mark reload-line "$(ujournal varta-watch | grep -m1 'event=reload ')"
systemctl kill -s SIGSTOP varta-agent
wait_for 30 in_journal varta-watch "event=stall.* pid=$apid "
mark stall-line "$(ujournal varta-watch | grep -m1 "event=stall.* pid=$apid ")"
systemctl kill -s SIGCONT varta-agent

# 4. The watchdog: the event loop wedged once (the test hook) when it first takes in
#    beats; systemd must kill it within WatchdogSec and start it again.
mkdir -p /etc/systemd/system/varta-watch.service.d
printf '[Service]\nEnvironment=VARTA_INJECT_WEDGE_MS=60000\n' >/etc/systemd/system/varta-watch.service.d/wedge.conf
systemctl daemon-reload
systemctl restart varta-watch
wpid=$(prop varta-watch MainPID)
wait_for 30 in_journal varta-watch "event=inject_wedge"
# The next start must not wedge again.
rm -r /etc/systemd/system/varta-watch.service.d
systemctl daemon-reload
restarted() { [ "$(prop varta-watch NRestarts)" -ge 1 ] && [ "$(systemctl is-active varta-watch)" = active ] && [ "$(prop varta-watch MainPID)" != "$wpid" ]; }
wait_for 60 restarted
mark watchdog pid_before="$wpid" pid_after="$(prop varta-watch MainPID)" nrestarts="$(prop varta-watch NRestarts)" \
    state="$(systemctl is-active varta-watch)" watchdog_usec="$(prop varta-watch WatchdogUSec)"
dump wd varta-watch "event=inject_wedge|WATCHDOG=1|Watchdog timeout|Killing process|Main process exited|Failed with result|restart counter|event=ready"

# 5. `systemctl stop`: STOPPING=1, then exit 0.
spid=$(prop varta-watch MainPID)
systemctl stop varta-watch
rc=$?
mark stop rc=$rc pid="$spid" result="$(prop varta-watch Result)" exec_code="$(prop varta-watch ExecMainCode)" \
    exec_status="$(prop varta-watch ExecMainStatus)"
dump stop-journal varta-watch "PID $spid .*STOPPING=1|Main process exited|Stopping |Stopped |Deactivated"

# 6. Socket activation (deploy/systemd/varta-watch.socket): `systemctl restart` of the
#    service keeps the agent counted (systemd holds the socket; the agent never reconnects
#    and the new instance takes it in from the state file, no agent_new).
install -m 0644 deploy/systemd/varta-watch.socket /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now varta-watch.socket varta-watch.service
beats() { http /metrics | sed -n "s/^varta_beats_total{pid=\"$apid\"} //p"; }
counted() { [ -n "$(beats)" ]; }
wait_for 30 counted
before=$(beats)
rpid=$(prop varta-watch MainPID)
systemctl restart varta-watch
npid=$(prop varta-watch MainPID)
more() { local n; n=$(beats); [ -n "$n" ] && [ "${n%.*}" -gt "${before%.*}" ]; }
wait_for 30 more
mark socket-restart rc=$? pid_before="$rpid" pid_after="$npid" beats_before="$before" beats_after="$(beats)" \
    agent_new_after="$(journalctl -q --no-pager _PID="$npid" | grep -c "event=agent_new.* pid=$apid ")"
systemctl stop varta-agent
