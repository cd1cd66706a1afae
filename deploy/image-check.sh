#!/usr/bin/env bash
# The container image, built and run for real, without a Docker engine:
#  1. local stand-ins for the Dockerfile's base images (deploy/base-images.sh;
#     made from Debian packages, so what this proves is the Dockerfile's own
#     steps and the image's contents, not the public base images);
#  2. the Dockerfile built with buildah on them; the binaries the manifests
#     and the compose file call are in it and run (--help), it runs as
#     nonroot (65532) by default, has no shell, and its size;
#  3. the stages and the example handler started from the image as
#     65532:65532 against the local RabbitMQ (a unique prefix, deleted
#     afterwards), the example message (googlebot: What is the air-speed velocity of an unladen swallow?) published with swallow-chat from the
#     image and its reply seen; nothing under the containers' roots changes
#     (the manifests mount them read-only);
#  4. deploy/compose.yaml validated with docker-compose and checked against
#     the image (commands), the stages (environment, ports, configuration)
#     and the README (image names).
# Needs root, buildah, debootstrap, docker-compose, python3-pika, curl and
# RabbitMQ on 127.0.0.1:5672 (rabbitmqctl, to list the prefix's queues and
# exchanges). Debian: apt-get install buildah debootstrap docker-compose python3-pika python3-yaml
#
# Usage: deploy/image-check.sh [--cold]
#   --cold  forget the cached stand-in images and build caches first.
# Caches (kept between runs, under $SWALLOW_BUILDAH_ROOT, default
# /var/lib/swallow-image-check): the stand-ins (keyed by a hash of what they
# are made from), buildah's layer cache and the Dockerfile's cache mounts
# (crate registry, target directory).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${SWALLOW_BUILDAH_ROOT:-/var/lib/swallow-image-check}
export SWALLOW_BUILDAH_ROOT=$ROOT
# buildah keeps the Dockerfile's cache mounts under $TMPDIR.
export TMPDIR=$ROOT/tmp
bh() { buildah --root "$ROOT/storage" --runroot "$ROOT/run" --storage-driver overlay "$@"; }
IMAGE=localhost/swallow:check
AMQP=${IMAGE_CHECK_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
PREFIX=imgcheck-$(date +%s)-$$
SEED="googlebot: What is the air-speed velocity of an unladen swallow?"
# The binaries' layer (COPY --from=build, uncompressed) stays under this.
MAX_LAYER_MB=${IMAGE_CHECK_MAX_LAYER_MB:-50}

# Debian's python3, where python3-pika and python3-yaml install.
PY=/usr/bin/python3
started=$(date +%s)
say() { echo "image-check: $*"; }
die() { echo "image-check: FAILED: $*" >&2; exit 1; }
# buildah (containers/storage) re-executes itself from a sealed memfd copy
# of its binary when it unshares; the kernel sometimes answers the seal with
# EBUSY ("Close_Fd sealing memfd copy: Device or resource busy") and buildah
# exits 1 before the image's program starts. That is buildah's own start, not
# the image: such a run is retried (3 attempts), any other failure is not.
REEXEC_TRIES=3
reexec_failed() { grep -q "sealing memfd copy" "$1" 2>/dev/null; }
# bh_run OUT ARGS...: buildah run ARGS, output to OUT, retried as above.
# Returns buildah's status, or 125 when every attempt failed that way.
bh_run() {
  local out=$1 i rc; shift
  for i in $(seq 1 "$REEXEC_TRIES"); do
    rc=0; bh run "$@" > "$out" 2>&1 || rc=$?
    [ "$rc" != 0 ] && reexec_failed "$out" || return "$rc"
    say "buildah's re-exec failed before the program started (sealing memfd copy: EBUSY), attempt $i of $REEXEC_TRIES"
  done
  return 125
}

for tool in buildah debootstrap docker-compose rabbitmqctl curl "$PY"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (Debian: apt-get install buildah debootstrap docker-compose python3-pika python3-yaml)"
done
"$PY" -c 'import pika, yaml' 2>/dev/null || die "python3-pika and python3-yaml are needed (Debian packages, for $PY)"
[ "$(id -u)" = 0 ] || die "needs root (buildah with chroot isolation, debootstrap)"

if [ "${1:-}" = --cold ]; then
  say "cold run: removing $ROOT"
  bh rm --all >/dev/null 2>&1 || true
  rm -rf "$ROOT"
fi
mkdir -p "$TMPDIR"

work=$(mktemp -d)
containers=()
pids=()
# The program `buildah run` (pid $1) started, named $2: buildah run does not
# pass signals on, so the program itself is signalled. (comm is cut at 15.)
program_under() {
  local p found
  for p in $(ps -o pid= --ppid "$1"); do
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "${2:0:15}" ]; then echo "$p"; return; fi
    found=$(program_under "$p" "$2"); [ -z "$found" ] || { echo "$found"; return; }
  done
}
# Stops every program started (SIGTERM, as Kubernetes does); fails when one
# does not exit within 30 s.
stop_all() {
  local pid prog deadline stuck=""
  for pid in "${pids[@]}"; do
    prog=$(program_under "$pid" "$(cat "$work/$pid.name" 2>/dev/null)")
    [ -z "$prog" ] || kill -TERM "$prog" 2>/dev/null || true
  done
  deadline=$(( $(date +%s) + 30 ))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      stuck="$stuck $(cat "$work/$pid.name")"
      prog=$(program_under "$pid" "$(cat "$work/$pid.name")")
      [ -z "$prog" ] || kill -KILL "$prog" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  pids=()
  [ -z "$stuck" ] || { echo "image-check: did not stop within 30 s of SIGTERM:$stuck" >&2; return 1; }
}
cleanup() {
  set +e
  stop_all
  for c in "${containers[@]}"; do bh rm "$c" >/dev/null 2>&1; done
  "$PY" - "$AMQP" "$PREFIX" <<'PY'
# Delete what the run declared: every queue and exchange named <prefix>.*
import subprocess, sys, urllib.parse, pika
url, prefix = sys.argv[1], sys.argv[2]
def names(kind):
    out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", f"list_{kind}", "name"],
                         capture_output=True, text=True, timeout=120).stdout
    return [n for n in out.split() if n.startswith(prefix + ".")]
conn = pika.BlockingConnection(pika.URLParameters(url))
queues, exchanges, failed = names("queues"), names("exchanges"), []
for kind, name in [("queue", q) for q in queues] + [("exchange", e) for e in exchanges]:
    try:
        ch = conn.channel()
        ch.queue_delete(name) if kind == "queue" else ch.exchange_delete(name)
        ch.close()
    except pika.exceptions.ChannelClosedByBroker as e:
        failed.append(f"{kind} {name}: {e}")
conn.close()
print(f"image-check: deleted {len(queues)} queues and {len(exchanges)} exchanges of the prefix {prefix}")
for f in failed:
    print(f"image-check: could not delete {f}", file=sys.stderr)
PY
  rm -rf "$work"
  say "wall time $(( $(date +%s) - started )) s"
}
trap cleanup EXIT

# 1. The stand-in base images. Containers an interrupted run left, and
# images that newer ones replaced, are removed first (disk space).
t=$(date +%s)
bh rm --all >/dev/null 2>&1 || true
bash deploy/base-images.sh
bh rmi --prune >/dev/null 2>&1 || true
say "base images ready in $(( $(date +%s) - t )) s"

# 2. The Dockerfile, as users build it.
t=$(date +%s)
for i in $(seq 1 "$REEXEC_TRIES"); do
  rc=0; bh bud --isolation chroot --layers --pull=never -t "$IMAGE" -f Dockerfile . > "$work/build.log" 2>&1 || rc=$?
  [ "$rc" != 0 ] && reexec_failed "$work/build.log" || break
  say "buildah's re-exec failed in a build step (sealing memfd copy: EBUSY), attempt $i of $REEXEC_TRIES"
done
[ "$rc" = 0 ] || { tail -40 "$work/build.log" >&2; die "buildah bud of the Dockerfile"; }
say "built the Dockerfile in $(( $(date +%s) - t )) s"

ctr=$(bh from --pull=never "$IMAGE"); containers+=("$ctr")
mnt=$(bh mount "$ctr")
# The binaries the Kubernetes manifests and the compose file call.
called=$( { grep -rhoE 'command: \["swallow-[a-z]+' deploy/k8s | sed 's/.*"//';
            docker-compose -f deploy/compose.yaml config | grep -oE '^ +- swallow-[a-z]+$' | sed 's/^ *- //'; } | sort -u)
for bin in $called; do
  [ -x "$mnt/usr/local/bin/$bin" ] || die "$bin (called by deploy/) is not in the image's /usr/local/bin"
  bh_run "$work/help.txt" --isolation chroot "$ctr" -- "$bin" --help || { cat "$work/help.txt" >&2; die "$bin --help in the image"; }
  say "$bin is in the image and runs (--help)"
done
user=$(bh inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
uid=$(awk -F: -v u="${user%%:*}" '$1 == u || $3 == u {print $3}' "$mnt/etc/passwd")
[ "$uid" = 65532 ] || die "the image's user is '$user' (uid '$uid'), not nonroot 65532"
say "the image runs as $user = uid $uid"
for sh in bin/sh bin/bash bin/dash bin/busybox usr/bin/sh usr/bin/bash usr/bin/dash usr/bin/busybox; do
  [ ! -e "$mnt/$sh" ] || die "the image has a shell: /$sh"
done
rc=0; bh_run "$work/sh.txt" --isolation chroot "$ctr" -- /bin/sh -c true || rc=$?
[ "$rc" != 0 ] || die "/bin/sh runs in the image"
[ "$rc" != 125 ] || die "buildah run could not start (to try /bin/sh)"
say "no shell in the image (/bin/sh does not run)"
image_mb=$(du -sb "$mnt" | awk '{printf "%.1f", $1 / 1e6}')
layer_mb=$(du -sb "$mnt/usr/local/bin" | awk '{printf "%.1f", $1 / 1e6}')
gz_mb=$(tar -C "$mnt" -cf - usr/local/bin | gzip -6 | wc -c | awk '{printf "%.1f", $1 / 1e6}')
say "image size ${image_mb} MB (files), of which the binaries' layer is ${layer_mb} MB (${gz_mb} MB gzipped, as pushed):"
(cd "$mnt/usr/local/bin" && du -b -- * | awk '{printf "image-check:   %-20s %5.1f MB\n", $2, $1 / 1e6}')
awk -v l="$layer_mb" -v m="$MAX_LAYER_MB" 'BEGIN { exit !(l <= m) }' || die "the binaries' layer is ${layer_mb} MB, over ${MAX_LAYER_MB} MB"
bh umount "$ctr" >/dev/null

# 3. The example message through the image: the stages, the example handler
# and the chat tool, each in a container of its own, as 65532:65532.
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gb_port=$(free_port)
sed -e "s|http://127.0.0.1:8088/googlebot|http://127.0.0.1:$gb_port/googlebot|" deploy/example.toml > "$work/swallow.toml"
chmod 644 "$work/swallow.toml"
grep -q "127.0.0.1:$gb_port" "$work/swallow.toml" || die "deploy/example.toml no longer points googlebot at 127.0.0.1:8088"
# A listing of a container's root (path, type, size, mode, owner, mtime).
listing() { (cd "$1" && find . -xdev -printf '%p %y %s %m %u:%g %T@\n' | sort); }
declare -A run_args=() run_tries=()
run_image() { # name extra-env command...
  local name=$1; shift
  local c; c=$(bh from --pull=never --name "$PREFIX-$name" "$IMAGE"); containers+=("$c")
  local m; m=$(bh mount "$c")
  listing "$m" > "$work/$name.before"
  echo "$m" > "$work/$name.mnt"
  run_args[$name]=$(printf '%q ' "$c" "$@")
  run_tries[$name]=1
  eval "start_image $name ${run_args[$name]}"
}
start_image() { # name container extra-env command...
  local name=$1 c=$2 extra=$3; shift 3
  bh run --isolation chroot --user 65532:65532 \
    --env "AMQP_URL=$AMQP" --env "SWALLOW_PREFIX=$PREFIX" --env SWALLOW_CONFIG=/etc/swallow/swallow.toml \
    --env RUST_LOG=info --env "$extra" --volume "$work/swallow.toml:/etc/swallow/swallow.toml:ro" \
    "$c" -- "$@" > "$work/$name.log" 2>&1 &
  pids+=($!)
  echo $! > "$work/$name.pid"
  echo "$1" > "$work/$!.name"
}
# A program started from the image whose buildah run exited in its re-exec
# (see bh_run) is started again, up to $REEXEC_TRIES times.
restart_reexec_failed() {
  local name pid keep=()
  for name in "${!run_args[@]}"; do
    pid=$(cat "$work/$name.pid")
    ! kill -0 "$pid" 2>/dev/null && reexec_failed "$work/$name.log" || continue
    [ "${run_tries[$name]}" -lt "$REEXEC_TRIES" ] || continue
    wait "$pid" 2>/dev/null || true
    for p in "${pids[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    pids=("${keep[@]}"); keep=()
    say "buildah's re-exec failed before $name started (sealing memfd copy: EBUSY), attempt ${run_tries[$name]} of $REEXEC_TRIES"
    run_tries[$name]=$(( ${run_tries[$name]} + 1 ))
    eval "start_image $name ${run_args[$name]}"
  done
}
wait_for() { # seconds what command...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    restart_reexec_failed
    sleep 0.5
  done
  say "$what"
}
# Waits for the one-shot program NAME to exit; its status.
wait_image() {
  local rc
  while :; do
    rc=0; wait "$(cat "$work/$1.pid")" || rc=$?
    [ "$rc" != 0 ] && reexec_failed "$work/$1.log" && [ "${run_tries[$1]}" -lt "$REEXEC_TRIES" ] || return "$rc"
    restart_reexec_failed
  done
}

run_image googlebot UNUSED=1 swallow-googlebot --addr "127.0.0.1:$gb_port"
wait_for 60 "googlebot (from the image) answers on 127.0.0.1:$gb_port" \
  curl -s -o /dev/null "http://127.0.0.1:$gb_port/" || { cat "$work/googlebot.log" >&2; die "googlebot did not start"; }
for stage in matcher deliverer responder; do
  port=$(free_port)
  run_image "$stage" "SWALLOW_HTTP_ADDR=127.0.0.1:$port" "swallow-$stage"
  wait_for 90 "swallow-$stage (from the image) is ready on 127.0.0.1:$port" \
    curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" || { cat "$work/$stage.log" >&2; die "swallow-$stage did not become ready"; }
  prog=$(program_under "$(cat "$work/$stage.pid")" "swallow-$stage")
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$prog/status" 2>/dev/null)
  [ "$uid" = 65532 ] || die "swallow-$stage runs as uid '$uid', not 65532"
done
say "the stages run as uid 65532"
run_image listen UNUSED=1 swallow-chat listen
wait_for 60 "swallow-chat listen (from the image) is listening" grep -q "listening for replies" "$work/listen.log" \
  || { cat "$work/listen.log" >&2; die "swallow-chat listen did not start"; }
run_image say UNUSED=1 swallow-chat say "$SEED"
wait_image say || { cat "$work/say.log" >&2; die "swallow-chat say \"$SEED\""; }
say "published: $SEED"
wait_for 60 "googlebot received the POST" grep -q "googlebot received a POST" "$work/googlebot.log" \
  || { cat "$work"/*.log >&2; die "googlebot received no POST within 60 s"; }
wait_for 60 "the reply arrived in the channel:" grep -q "African or European" "$work/listen.log" \
  || { cat "$work"/*.log >&2; die "no reply within 60 s"; }
grep -A1 -m1 "African or European" "$work/listen.log" | sed 's/^/image-check:   /'

# Stop everything (SIGTERM), then compare each container's root with before.
stop_all || die "stopping the programs started from the image"
say "all stopped on SIGTERM"
for name in googlebot matcher deliverer responder listen say; do
  listing "$(cat "$work/$name.mnt")" > "$work/$name.after"
  # buildah run itself leaves the mount points of /etc/hosts, /etc/resolv.conf,
  # /etc/hostname, /run/.containerenv and the -v target; the rest is the program's.
  changed=$(diff "$work/$name.before" "$work/$name.after" | grep '^[<>]' \
    | grep -vE '^[<>] \./(etc/hosts|etc/resolv.conf|etc/hostname|run|run/\.containerenv|etc/swallow|etc/swallow/swallow.toml|etc|dev|proc|sys|\.) ' || true)
  [ -z "$changed" ] || { echo "$changed" >&2; die "$name wrote to its root filesystem"; }
done
say "nothing under the containers' roots changed"

# 4. The compose file.
docker-compose -f deploy/compose.yaml config -q || die "docker-compose config: deploy/compose.yaml is not valid"
say "docker-compose config: deploy/compose.yaml is valid"
docker-compose -f deploy/compose.yaml config > "$work/compose.yaml"
ctr=$(bh from --pull=never "$IMAGE"); containers+=("$ctr")
ls "$(bh mount "$ctr")/usr/local/bin" > "$work/bins"
"$PY" - "$work/compose.yaml" "$work/bins" "$ctr" <<'PY' || die "deploy/compose.yaml does not match the image, the stages or the docs"
import os, re, subprocess, sys, pathlib, tomllib, yaml
compose = yaml.safe_load(open(sys.argv[1]))
bins = set(open(sys.argv[2]).read().split())
ctr = sys.argv[3]
root = pathlib.Path(".")
# The README and the operations guide tell users which images to run.
readme = "".join((root / f).read_text() for f in ("README.md", "docs/operations.md"))
# What the stages and tools read from the environment.
src = "".join(p.read_text() for d in ("shared/src", "tests/tools/src") for p in (root / d).rglob("*.rs"))
env_read = set(re.findall(r'(?:nonempty|env::var)\("([A-Z_]+)"\)|env = "([A-Z_]+)"', src))
env_read = {a or b for a, b in env_read}
dockerfile = (root / "Dockerfile").read_text()
exposed = set(re.findall(r"^EXPOSE (.*)$", dockerfile, re.M)[0].split())
store = os.environ["SWALLOW_BUILDAH_ROOT"]
bh = ["buildah", "--root", f"{store}/storage", "--runroot", f"{store}/run", "--storage-driver", "overlay"]
errors = []
def check(ok, what):
    print(f"image-check: compose: {'ok' if ok else 'WRONG'}: {what}")
    if not ok: errors.append(what)

rabbit = compose["services"]["rabbitmq"]["image"]
check(f"`{rabbit}`" in readme, f"RabbitMQ image {rabbit} is the one the docs name")
k8s_images = set(re.findall(r"image: (swallow:\S+)", "".join(p.read_text() for p in (root / "deploy/k8s").rglob("*.yaml"))))
for img in k8s_images:
    name = img.split(":")[0]
    check(f"set image {name}=" in readme and f"/{img}" in readme, f"the manifests' image {img} is what the docs tell users to build and set")
dev_rabbit = re.findall(r"image: (rabbitmq:\S+)", (root / "deploy/k8s/overlays/dev/rabbitmq.yaml").read_text())
check(dev_rabbit == [rabbit], f"the dev overlay's RabbitMQ image {dev_rabbit} is the compose file's {rabbit}")

for name, svc in compose["services"].items():
    if name == "rabbitmq":
        continue
    build = svc.get("build", {})
    check(pathlib.Path(build.get("context", ""), build.get("dockerfile", "Dockerfile")).resolve() == (root / "Dockerfile").resolve(),
          f"{name} builds the repository's Dockerfile")
    cmd = svc["command"]
    check(cmd[0] in bins, f"{name}: {cmd[0]} is in the image")
    for attempt in range(3):  # buildah's re-exec flake, as bh_run above
        r = subprocess.run(bh + ["run", "--isolation", "chroot", ctr, "--"] + cmd + ["--help"], capture_output=True, text=True)
        if r.returncode == 0 or "sealing memfd copy" not in r.stderr + r.stdout:
            break
    check(r.returncode == 0, f"{name}: `{' '.join(cmd)}` parses in the image" + ("" if r.returncode == 0 else f" ({r.stderr.strip()[:200]})"))
    env = svc.get("environment", {})
    for key in env:
        check(key in env_read, f"{name}: {key} is read by the stages")
    cfg_path = env.get("SWALLOW_CONFIG")
    mounts = dict((v["target"], v["source"]) if isinstance(v, dict) else tuple(v.split(":")[1::-1])
                  for v in svc.get("volumes", []))
    check(cfg_path in mounts, f"{name}: SWALLOW_CONFIG={cfg_path} is mounted")
    cfg = tomllib.loads(pathlib.Path(mounts[cfg_path]).read_text())
    stage = cmd[0].removeprefix("swallow-")
    for port in svc.get("ports", []):
        published = str(port.get("target") if isinstance(port, dict) else port.split(":")[-1])
        addr = cfg.get(stage, {}).get("http_addr", "")
        check(addr == f"0.0.0.0:{published}", f"{name}: port {published} is where {stage} listens ({addr}), on all interfaces")
        check(published in exposed, f"{name}: port {published} is EXPOSEd in the Dockerfile")
    if stage == "googlebot":
        addr = cmd[cmd.index("--addr") + 1]
        urls = [u for i in cfg.get("integrations", []) for u in i.get("urls", [])]
        check(any(u.startswith(f"http://{name}:{addr.split(':')[1]}/") for u in urls),
              f"googlebot listens on {addr}, where the compose configuration's integration POSTs ({urls})")
        check(addr.startswith("0.0.0.0:"), f"googlebot listens on all interfaces ({addr})")
if errors:
    sys.exit(1)
PY
say "deploy/compose.yaml matches the image, the stages and the docs"
