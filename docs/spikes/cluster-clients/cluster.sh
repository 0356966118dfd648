#!/bin/bash
# start/stop the spike cluster (ports 7101-7106) and standalone (7200)
D=${SPIKE_DATA:-/tmp/pushsvc-spike17}
case "$1" in
start)
  for p in 7101 7102 7103 7104 7105 7106; do
    mkdir -p $D/$p
    redis-server --port $p --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes-$p.conf --cluster-node-timeout 2000 --save '' --appendonly no --daemonize yes --dir $D/$p --pidfile $D/$p/pid --logfile $D/$p/log
  done
  sleep 1
  redis-cli --cluster create 127.0.0.1:7101 127.0.0.1:7102 127.0.0.1:7103 127.0.0.1:7104 127.0.0.1:7105 127.0.0.1:7106 --cluster-replicas 1 --cluster-yes
  redis-server --port 7200 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --dir $D --pidfile $D/7200.pid --logfile $D/7200.log
  ;;
stop)
  for f in $D/*/pid $D/7200.pid; do [ -f $f ] && kill $(cat $f) 2>/dev/null; done
  ;;
esac
