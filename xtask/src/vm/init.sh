#!/bin/busybox sh
# /init of a VM-runner guest. It only acts and waits for events; the host judges. Every line
# for the host starts with "@@vm:<tag> " (serial lines may begin with escape codes). The
# figures come from the kernel command line (unknown name=value parameters become init's
# environment): vm_mode, vm_spoof, vm_junk, vm_short, vm_flood, vm_rate, vm_threshold.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs -o mode=0755 run /run
exec </dev/console >/dev/console 2>&1

say() { echo "@@vm:$*"; }
finish() { say end; sync; poweroff -f; }
say begin kernel=$(uname -r) arch=$(uname -m) memlock=$(ulimit -l)
[ "$vm_mode" = probe ] && finish

ip link set lo up
ln -s varta-watch /bin/varta-nsagent
mkdir -p /run/varta
S=/run/varta/varta.sock
M=127.0.0.1:9100

# wait_log PID FILE SECONDS PATTERN: until PATTERN is in FILE; gives up when PID is gone.
wait_log() {
    n=$(($3 * 20))
    while [ $n -gt 0 ]; do
        grep -q -- "$4" "$2" && return 0
        kill -0 "$1" 2>/dev/null || { grep -q -- "$4" "$2"; return; }
        usleep 50000
        n=$((n - 1))
    done
    return 1
}
# step NAME RC: one line per step, so a failed or hung VM shows how far it got.
step() { say step name=$1 rc=$2; }
# dump TAG FILE
dump() { sed "s/^/@@vm:$1 /" "$2"; }

# observe LOG: the daemon with the scenario's command line, logging to LOG; D is its pid.
observe() {
    : >$1
    varta-watch --socket $S --socket-mode 0666 --prom-addr $M --threshold-ms $vm_threshold \
        --max-beat-rate $vm_rate --allow-cross-namespace-agents >$1 2>&1 &
    D=$!
}

observe /tmp/main.log
wait_log $D /tmp/main.log 60 'event=ready'
step ready $?

# An unprivileged agent.
varta-caps --uid 65534 -- varta-watch agent --socket $S --interval-ms 100 &
A=$!
say agent pid=$A
wait_log $D /tmp/main.log 20 "event=agent_new pid=$A "
step agent $?

# A spoofed pid (the agent's, from another unprivileged process), junk, an over-rate agent.
say spoof $(varta-caps --uid 65534 -- varta-sender $S forge $vm_spoof $A)
say junk $(varta-sender $S hex $vm_junk 0000000000000000000000000000000000000000000000000000000000000000)
say short $(varta-sender $S hex $vm_short 5641)
say flood $(varta-sender $S flood $vm_flood)

# A cross-namespace agent: sh is pid 1 of the new namespace, the agent pid 2.
unshare -p -f sh -c "varta-nsagent agent --socket $S --interval-ms 100 & wait" &
wait_log $D /tmp/main.log 20 'cross_namespace=true'
step cross_namespace $?
killall varta-nsagent

# One stall: the agent stops beating but lives.
kill -STOP $A
wait_log $D /tmp/main.log 20 "event=stall pid=$A "
step stall $?
kill -KILL $A

wget -q -O /tmp/metrics http://$M/metrics
step metrics $?
dump metric /tmp/metrics

# A restart: an agent beating, SIGTERM, the same command line again. The pinned maps (and
# the state file) carry the agent; it keeps being counted and its stall comes from the new
# instance.
varta-caps --uid 65534 -- varta-watch agent --socket $S --interval-ms 100 &
B=$!
wait_log $D /tmp/main.log 20 "event=agent_new pid=$B "
step restart_agent $?
kill -TERM $D
wait $D
say sigterm rc=$?
dump main /tmp/main.log
observe /tmp/restart.log
wait_log $D /tmp/restart.log 60 'event=resumed.*from=pins'
step restart_resumed $?
kill -STOP $B
wait_log $D /tmp/restart.log 20 "event=stall pid=$B "
step restart_stall $?
kill -KILL $B
kill -TERM $D
wait $D
say restart_sigterm rc=$?
dump restart /tmp/restart.log

# Least privilege: the set the daemon names when it has no capability at all, then exactly
# that set, then each one of it removed in turn.
caps_run() {
    : >/tmp/$1.log
    varta-caps --keep $2 -- varta-watch --socket /run/varta/$1.sock --threshold-ms $vm_threshold \
        >/tmp/$1.log 2>&1 &
    P=$!
    wait_log $P /tmp/$1.log 60 'event=ready'
    r=$?
    kill -TERM $P
    wait $P
    say caps name=$1 keep=$2 ready_rc=$r sigterm_rc=$?
    dump log.$1 /tmp/$1.log
}
caps_run none none
# The capabilities named as missing: outside the parentheses (inside is the set to grant).
need=$(grep -m1 event=datapath_fallback /tmp/none.log | sed 's/([^)]*)//g' | grep -o 'CAP_[A-Z_]*' | sort -u |
    sed 's/^CAP_//' | tr 'A-Z\n' 'a-z,' | sed 's/,$//')
caps_run all ${need:-none}
for c in $(echo $need | tr , ' '); do
    keep=$(echo ",$need," | sed "s/,$c,/,/; s/^,//; s/,\$//")
    caps_run no_$c ${keep:-none}
done
finish
