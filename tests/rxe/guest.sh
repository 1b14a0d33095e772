#!/bin/sh
# The soft-RoCE cases; one `RXE-RESULT case=NAME ok=0|1 ...` line each.
IP=10.0.2.15
SIZE=32MiB
cd /tmp
head -c 32 /dev/urandom >key
head -c 32 /dev/urandom >otherkey

# The IPv4-mapped RoCE v2 GID of rxe0 (rdmig finds it itself; ib_write_bw needs the index).
GID=""
for i in $(seq 1 100); do
	for f in /sys/class/infiniband/rxe0/ports/1/gids/*; do
		case "$(cat "$f" 2>/dev/null)" in 0000:0000:0000:0000:0000:ffff:*)
			t=$(cat /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$(basename "$f") 2>/dev/null)
			[ "$t" = "RoCE v2" ] && GID=$(basename "$f") ;;
		esac
	done
	[ -n "$GID" ] && break
	sleep 0.1
done
echo "rxe0 RoCE v2 GID index: $GID"
rdmig devices

field() { # field NAME FILE: a scalar from a pretty-printed JSON report
	grep -m1 "\"$1\":" "$2" | sed -E 's/.*": "?([^",]*)"?,?$/\1/'
}

start_workload() { # start_workload FILE RATE [PATTERN]
	rm -f ready "$1"
	rdmig workload --ram "$1" --size $SIZE --dirty-rate "$2" --pattern "${3:-hot:0.25}" \
		--bitmap "$1.dirty" --ready-file ready 2>wl.err &
	WPID=$!
	i=0
	while [ ! -f ready ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
}

start_recv() { # start_recv PORT KEYFILE
	rm -f addr dst.json /dev/shm/dst.ram
	rdmig recv --listen $IP:$1 --transport rdma --psk-file "$2" --json --addr-file addr \
		--ram ram=/dev/shm/dst.ram:$SIZE >dst.json 2>dst.err &
	RPID=$!
	i=0
	while [ ! -s addr ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}

# bounded PID SECONDS: waits for a background process at most SECONDS; a process still
# running then is a hang (every wait of rdmig is bounded): its stderr is shown, it is killed,
# and the exit status is 124.
bounded() {
	i=0
	while kill -0 "$1" 2>/dev/null && [ $i -lt $(($2 * 10)) ]; do sleep 0.1; i=$((i + 1)); done
	if kill -0 "$1" 2>/dev/null; then
		echo "RXE-HANG pid $1 still running after $2 s"
		kill -9 "$1"; wait "$1" 2>/dev/null
		return 124
	fi
	wait "$1"
}

# run_case NAME PORT EXTRA-SEND-ARGS...: a complete migration, checked and verified.
run_case() {
	name=$1; port=$2; shift 2
	start_workload /dev/shm/src.ram 5
	start_recv $port key
	t0=$(date +%s)
	args=$(echo "$*" | sed "s/@WPID@/$WPID/g")
	RDMIG_LOG=info rdmig send --connect $IP:$port --transport rdma --psk-file key --json --verify \
		--ram ram=/dev/shm/src.ram --pid $WPID --downtime-limit 100 $args >src.json 2>src.err &
	bounded $! 90; src=$?
	bounded $RPID 40; dst=$?
	t1=$(date +%s)
	kill -9 $WPID 2>/dev/null; wait $WPID 2>/dev/null
	ok=0
	[ $src -eq 0 ] && [ $dst -eq 0 ] && [ "$(field verified src.json)" = true ] && ok=1
	echo "RXE-RESULT case=$name ok=$ok status=$(field status src.json) dst_status=$(field status dst.json) verified=$(field verified src.json) reason=$(field reason src.json) detail=\"$(field detail src.json)\" dst_detail=\"$(field detail dst.json)\" rounds=$(grep -c '"round":' src.json) throughput_mb_s=$(field throughput_mb_s src.json) downtime_ms=$(field downtime_ms src.json) wall_s=$((t1 - t0)) transport=$(field transport src.json)"
	[ $ok -eq 1 ] || { tail -15 src.err; tail -8 dst.err; }
	rm -f /dev/shm/src.ram* /dev/shm/dst.ram*
}

run_case dynamic-1ch 7001 --channels 1 --dirty-log bitmap:/dev/shm/src.ram.dirty
run_case pinall-2ch 7002 --channels 2 --pin-all --dirty-log bitmap:/dev/shm/src.ram.dirty
run_case soft-dirty 7003 --channels 1 --dirty-log soft-dirty:@WPID@

# Device state larger than the control channel carries (80 MiB and a partial page): RDMA
# WRITEs from the source's registered state buffer into the destination's staging area,
# its digest checked (spec: STATE-1 .. STATE-5).
head -c 83887000 /dev/urandom >state.bin
run_case state-area 7007 --channels 2 --dirty-log bitmap:/dev/shm/src.ram.dirty --state-in /tmp/state.bin
ok=0
[ "$(field device_state_path src.json)" = "data channels" ] && [ "$(field device_state src.json)" = 83887000 ] &&
	[ "$(field device_state dst.json)" = 83887000 ] && ok=1
echo "RXE-RESULT case=state-area-path ok=$ok path=\"$(field device_state_path src.json)\" bytes=$(field device_state src.json) dst_bytes=$(field device_state dst.json)"
rm -f state.bin

# Wrong key: the destination holds another key; the source must abort with AuthFailed, and
# the destination, a server, keeps listening (a failed handshake ends that connection only)
# until the operator stops it with SIGTERM (exit 2, Cancelled).
start_workload /dev/shm/src.ram 5
start_recv 7004 otherkey
rdmig send --connect $IP:7004 --transport rdma --psk-file key --json \
	--ram ram=/dev/shm/src.ram --pid $WPID --dirty-log bitmap:/dev/shm/src.ram.dirty >src.json 2>src.err &
bounded $! 60; src=$?
listening=0
kill -0 $RPID 2>/dev/null && listening=1
kill -TERM $RPID
bounded $RPID 10; dst=$?
ok=0
[ $src -eq 2 ] && [ "$(field reason src.json)" = AuthFailed ] && [ $listening -eq 1 ] &&
	[ $dst -eq 2 ] && [ "$(field reason dst.json)" = Cancelled ] && ok=1
echo "RXE-RESULT case=wrong-key ok=$ok src_exit=$src dst_exit=$dst src_reason=$(field reason src.json) dst_listening=$listening dst_reason=$(field reason dst.json)"
[ $ok -eq 1 ] || { tail -5 src.err dst.err; }
kill -9 $WPID 2>/dev/null; wait $WPID 2>/dev/null
rm -f /dev/shm/src.ram* /dev/shm/dst.ram*

# Killed destination: a migration that cannot converge (1 ms downtime limit); the destination
# is killed 0.2 s into the baseline copy (64 MiB take about a second over rxe); the source
# must abort and resume the workload.
start_workload /dev/shm/src.ram 40 uniform
start_recv 7005 key
RDMIG_LOG=info rdmig send --connect $IP:7005 --transport rdma --psk-file key --json --max-rounds 100000 \
	--downtime-limit 1 --on-limit abort --ram ram=/dev/shm/src.ram --pid $WPID \
	--dirty-log bitmap:/dev/shm/src.ram.dirty >src.json 2>src.err &
SPID=$!
# The first scan's log line comes right before the baseline copy starts.
i=0
while ! grep -q "dirty scan" src.err 2>/dev/null && [ $i -lt 600 ]; do
	sleep 0.01
	i=$((i + 1))
done
sleep 0.2
kill -9 $RPID
t0=$(date +%s)
bounded $SPID 60; src=$?
t1=$(date +%s)
sleep 0.5
state=$(awk '/^State:/ {print $2}' /proc/$WPID/status)
before=$(stat -c %Y /dev/shm/src.ram.dirty 2>/dev/null)
ok=0
# Detected through the closed bootstrap connection, well before the 30 s idle timeout.
[ $src -eq 2 ] && [ "$(field status src.json)" = aborted ] && [ "$state" != T ] &&
	[ $((t1 - t0)) -le 10 ] && ok=1
echo "RXE-RESULT case=killed-destination ok=$ok src_exit=$src status=$(field status src.json) reason=$(field reason src.json) workload_state=$state detect_s=$((t1 - t0))"
# Detection normally takes 0-1 s; show what the source did when it took long.
[ $ok -eq 1 ] && [ $((t1 - t0)) -le 10 ] || tail -15 src.err
kill -9 $WPID 2>/dev/null; wait $WPID 2>/dev/null
rm -f /dev/shm/src.ram* /dev/shm/dst.ram*

# Throughput: ib_write_bw on rxe0 against rdmig moving 64 MiB of static memory (pin-all,
# 1 channel), in the same guest, for the ratio.
ib_write_bw -d rxe0 -x $GID -s 1048576 -n 100 -F >bw_srv.txt 2>&1 &
BPID=$!
sleep 1
ib_write_bw -d rxe0 -x $GID -s 1048576 -n 100 -F $IP >bw_cli.txt 2>&1
wait $BPID
ibbw=$(awk '$1 == 1048576 {print $4}' bw_cli.txt | tail -1)
SIZE=64MiB
start_workload /dev/shm/src.ram 0
start_recv 7006 key
rdmig send --connect $IP:7006 --transport rdma --psk-file key --json --pin-all --no-zero-elision \
	--ram ram=/dev/shm/src.ram --pid $WPID --dirty-log none >src.json 2>src.err &
bounded $! 120; src=$?
bounded $RPID 40
tp=$(field throughput_mb_s src.json)
ok=0
[ $src -eq 0 ] && [ -n "$ibbw" ] && ok=1
# ib_write_bw reports MB/s as 2^20 bytes per second; rdmig reports 10^6 bytes per second.
ratio=$(awk -v a="$tp" -v b="$ibbw" 'BEGIN { if (b > 0) printf "%.2f", (a * 1e6 / 1048576) / b; else print "nan" }')
echo "RXE-RESULT case=throughput ok=$ok ib_write_bw_MiB_s=$ibbw rdmig_MB_s=$tp ratio=$ratio"
[ $ok -eq 1 ] || { tail -5 bw_cli.txt src.err; }
kill -9 $WPID 2>/dev/null
