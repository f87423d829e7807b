#!/bin/sh
# workspace-pilot guest agent (docs/hosting-vms.md, "The guest agent"). POSIX sh: dash, bash, busybox.
#
# Inside a leased VM, it
#  - keeps the HEPiX Machine/Job Features current: $MACHINEFEATURES and $JOBFEATURES (/run/machinefeatures and
#    /run/jobfeatures unless WORKSPACE_PILOT_MJF says where), one file per key, from the features the VM started
#    with (FEATURES_FILE, the seed's "features") and the pilot's "mjf DIR KEY VALUE" lines on the lease channel
#    whenever the VM's end moves (an extension, a release, the batch system's stop);
#  - tells the pilot whether this guest is busy or idle: what a workload last wrote ("busy" or "idle") to
#    /run/workspace-pilot/usage (WORKSPACE_PILOT_USAGE), as "usage busy" or "usage idle" on the lease channel,
#    when it changes and every 30 s; where nothing is written the pilot judges by the VM's CPU use instead.
# It prints every line the pilot sends on standard output (its log), appends the others (the warning before the
# end: "ending TIME SECONDS WHY", docs/leases.md) to /run/workspace-pilot/lease-channel for the guest's own
# programs (the port has one opener: the agent), and never exits on its own.
#
# Usage: workspace-pilot-agent [FEATURES_FILE]
set -u
channel_name=org.workspace-pilot.lease.0
mjf=${WORKSPACE_PILOT_MJF:-/run}
usage_file=${WORKSPACE_PILOT_USAGE:-/run/workspace-pilot/usage}
told_file=${usage_file%/*}/lease-channel  # what the pilot said besides the features, for the guest's programs
etc=${WORKSPACE_PILOT_ETC:-/etc}  # where the variables are set for logins (another place only for tests)
look_every=2        # seconds between looks at the usage file
repeat_after=15     # looks: the last word is said again this often (30 s), for a pilot that missed it

# One "mjf DIR KEY VALUE" line into its file (written under another name, then renamed: a reader sees the old
# value or the new one, never half of one); any other line changes nothing. The pilot checks the same forms.
apply() {
  [ "$#" -eq 4 ] && [ "$1" = mjf ] || return 0
  case "$2" in machinefeatures|jobfeatures) ;; *) return 0 ;; esac
  case "$3" in ''|[!a-z]*|*[!a-z0-9_]*) return 0 ;; esac
  case "$4" in ''|*[!A-Za-z0-9._-]*) return 0 ;; esac
  [ "${#3}" -le 48 ] && [ "${#4}" -le 128 ] || return 0
  mkdir -p "$mjf/$2" && printf '%s\n' "$4" > "$mjf/$2/.$3.new" && mv -f "$mjf/$2/.$3.new" "$mjf/$2/$3"
}

# Where the lease channel is: udev's link, else the port whose name says so (given 10 s to appear).
find_port() {
  if [ -n "${WORKSPACE_PILOT_PORT:-}" ]; then echo "$WORKSPACE_PILOT_PORT"; return 0; fi
  tries=0
  while [ "$tries" -lt 100 ]; do
    if [ -e "/dev/virtio-ports/$channel_name" ]; then echo "/dev/virtio-ports/$channel_name"; return 0; fi
    for port in /sys/class/virtio-ports/*; do
      if [ "$(cat "$port/name" 2>/dev/null)" = "$channel_name" ] && [ -e "/dev/${port##*/}" ]; then
        echo "/dev/${port##*/}"; return 0
      fi
    done
    sleep 0.1 2>/dev/null || sleep 1
    tries=$((tries + 1))
  done
  return 1
}

# The variables, for login shells (profile.d) and PAM sessions (/etc/environment); once.
export_variables() {
  if [ -d "$etc/profile.d" ]; then
    printf 'export MACHINEFEATURES=%s/machinefeatures JOBFEATURES=%s/jobfeatures\n' "$mjf" "$mjf" \
      > "$etc/profile.d/workspace-pilot-mjf.sh" 2>/dev/null
  fi
  if [ -w "$etc/environment" ] && ! grep -q '^MACHINEFEATURES=' "$etc/environment" 2>/dev/null; then
    printf 'MACHINEFEATURES=%s/machinefeatures\nJOBFEATURES=%s/jobfeatures\n' "$mjf" "$mjf" >> "$etc/environment"
  fi
}

report_usage() {
  last='' looks=0
  while :; do
    word=''
    [ -r "$usage_file" ] && read -r word < "$usage_file"
    case "$word" in busy|idle) ;; *) word='' ;; esac
    looks=$((looks + 1))
    if [ -n "$word" ] && { [ "$word" != "$last" ] || [ "$looks" -ge "$repeat_after" ]; }; then
      printf 'usage %s\n' "$word" >&3 2>/dev/null && last=$word && looks=0
    fi
    sleep "$look_every"
  done
}

mkdir -p "$mjf/machinefeatures" "$mjf/jobfeatures" "${usage_file%/*}"
if [ "$#" -ge 1 ] && [ -r "$1" ]; then
  while read -r line; do set -f; apply $line; set +f; done < "$1"
fi
export_variables
port=$(find_port) || { echo "workspace-pilot-agent: no $channel_name port: the features stay as the VM started" >&2; exit 1; }
# One open of the port for both directions: a virtio port takes one opener at a time.
exec 3<>"$port"
report_usage &
reporter=$!
trap 'kill "$reporter" 2>/dev/null' EXIT
trap 'exit 0' TERM INT
echo "workspace-pilot-agent: lease channel $port open"
while :; do
  printf 'hello\n' >&3 2>/dev/null  # the pilot answers with the features as they are now
  while IFS= read -r line <&3; do
    printf '%s\n' "$line"
    case "$line" in
      'mjf '*) set -f; apply $line; set +f ;;  # split into words: never expand a "*" into file names
      *) printf '%s\n' "$line" >> "$told_file" ;;
    esac
  done
  sleep 1  # end-of-file: no pilot is connected; look again
done
