#!/usr/bin/env bash
# Local STAND-INS for the Dockerfile's two base images, made from Debian
# packages, for machines with no Docker engine and no registry to pull from
# (deploy/image-check.sh builds the real Dockerfile on them with buildah).
#
# They are stand-ins: what a build on them proves is the Dockerfile's own
# steps and the contents of the image it makes, not the public base images.
#
#  - docker.io/library/rust:1-bookworm: a Debian bookworm root filesystem
#    (debootstrap, minbase, plus the C toolchain the official image's
#    buildpack-deps base has) with this machine's stable Rust toolchain
#    copied in where the official image has it, with its environment:
#    RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo,
#    PATH=/usr/local/cargo/bin:$PATH (profile minimal: no docs), and this
#    machine's local CAs (/usr/local/share/ca-certificates) if it has any.
#  - gcr.io/distroless/cc-debian12:nonroot: built the way distroless is
#    built: the files of the Debian packages it contains unpacked with
#    `dpkg-deb -x` into an empty root (no maintainer scripts, no dpkg, no
#    shell), the CA bundle concatenated from ca-certificates' files,
#    /etc/passwd and /etc/group with root, nobody and nonroot (65532), and
#    the image config of :nonroot (user 65532, workdir /home/nonroot).
#
# Each image is labelled (swallow.standin.key) with a hash of what it is made from (this script,
# the toolchain's version, the packages' versions); an image whose label
# matches is kept, so only a cold run pays for debootstrap. `--force`
# rebuilds both.
#
# Usage (root; Debian: apt-get install buildah debootstrap):
#   deploy/base-images.sh [--force]
# Storage: a private buildah store (overlay: vfs would copy each layer whole) under $SWALLOW_BUILDAH_ROOT
# (default /var/lib/swallow-image-check), shared with deploy/image-check.sh.
set -euo pipefail
trap 'echo "base-images: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."

ROOT=${SWALLOW_BUILDAH_ROOT:-/var/lib/swallow-image-check}
bh() { buildah --root "$ROOT/storage" --runroot "$ROOT/run" --storage-driver overlay "$@"; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDER=docker.io/library/rust:1-bookworm
RUNTIME=gcr.io/distroless/cc-debian12:nonroot
# distroless' cc-debian12 = static (base-files, netbase, tzdata,
# ca-certificates) + base (libc6, libssl3) + cc (libgcc-s1, libgomp1, libstdc++6).
RUNTIME_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libssl3 libgcc-s1 libgomp1 libstdc++6)
# The official image's base (buildpack-deps:bookworm) has these and more;
# these are what a Rust build that links with cc needs.
BUILDER_PACKAGES=ca-certificates,gcc,libc6-dev,make,pkg-config,libssl-dev,git,curl

force=false
[ "${1:-}" = --force ] && force=true

RUSTUP_SRC=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_SRC=${CARGO_HOME:-$HOME/.cargo}
TOOLCHAIN_DIR=$(cd "$RUSTUP_SRC/toolchains/stable-x86_64-unknown-linux-gnu" && pwd -P)
RUST_VERSION=$("$TOOLCHAIN_DIR/bin/rustc" --version | awk '{print $2}')

versions() { apt-cache show --no-all-versions "$@" | awk '/^(Package|Version):/ {printf "%s ", $2} END {print ""}'; }
script_hash=$(sha256sum "$0" | cut -c1-16)
builder_key=$(printf '%s\n' "$script_hash" "$("$TOOLCHAIN_DIR/bin/rustc" -vV)" "$BUILDER_PACKAGES" \
  "$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum)" | sha256sum | cut -c1-16)
runtime_key=$(printf '%s\n' "$script_hash" "$(versions "${RUNTIME_PACKAGES[@]}")" | sha256sum | cut -c1-16)

# The image's key label, or nothing when it is not in the store.
key_of() { bh inspect --type image --format '{{index .OCIv1.Config.Labels "swallow.standin.key"}}' "$1" 2>/dev/null || true; }

cleanup_ctr=""
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -z "$cleanup_ctr" ] || bh rm "$cleanup_ctr" >/dev/null 2>&1 || true' EXIT

commit() { # container image key
  bh config --label "swallow.standin.key=$3" \
    --label "org.opencontainers.image.description=LOCAL STAND-IN for $2 (deploy/base-images.sh), not the public image" "$1"
  bh commit --quiet --rm "$1" "$2" >/dev/null
  cleanup_ctr=""
}

if $force || [ "$(key_of "$BUILDER")" != "$builder_key" ]; then
  echo "base-images: making the stand-in $BUILDER (debootstrap bookworm + Rust $RUST_VERSION)"
  ctr=$(bh from scratch); cleanup_ctr=$ctr
  mnt=$(bh mount "$ctr")
  debootstrap --variant=minbase --include="$BUILDER_PACKAGES" bookworm "$mnt" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/*
  # This machine's own CAs (a TLS-inspecting egress proxy), so that cargo in
  # the build reaches crates.io as it does here. Not in the public image.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$mnt/usr/local/share/ca-certificates/"
    env -u TMPDIR chroot "$mnt" update-ca-certificates >/dev/null  # (the host's TMPDIR is not in the chroot)
  fi
  # rustup's layout, as `rustup-init --profile minimal` leaves it (no docs).
  mkdir -p "$mnt/usr/local/rustup/toolchains" "$mnt/usr/local/cargo/bin"
  cp -a "$TOOLCHAIN_DIR" "$mnt/usr/local/rustup/toolchains/stable-x86_64-unknown-linux-gnu"
  rm -rf "$mnt/usr/local/rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc"
  printf 'version = "12"\ndefault_toolchain = "stable-x86_64-unknown-linux-gnu"\nprofile = "minimal"\n' \
    > "$mnt/usr/local/rustup/settings.toml"
  cp "$CARGO_SRC/bin/rustup" "$mnt/usr/local/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc rust-gdb rust-lldb cargo-clippy clippy-driver cargo-fmt rustfmt; do
    ln -f "$mnt/usr/local/cargo/bin/rustup" "$mnt/usr/local/cargo/bin/$proxy"
  done
  chmod -R a+w "$mnt/usr/local/rustup" "$mnt/usr/local/cargo"
  bh umount "$ctr" >/dev/null
  bh config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$RUST_VERSION" --cmd bash "$ctr"
  commit "$ctr" "$BUILDER" "$builder_key"
else
  echo "base-images: the stand-in $BUILDER is up to date (key $builder_key)"
fi

if $force || [ "$(key_of "$RUNTIME")" != "$runtime_key" ]; then
  echo "base-images: making the stand-in $RUNTIME (dpkg-deb -x of ${RUNTIME_PACKAGES[*]})"
  (cd "$work" && apt-get download -o APT::Sandbox::User=root "${RUNTIME_PACKAGES[@]}" >/dev/null)
  ctr=$(bh from scratch); cleanup_ctr=$ctr
  mnt=$(bh mount "$ctr")
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$mnt"; done
  # What distroless adds around the packages' files.
  rm -rf "$mnt/usr/share/doc" "$mnt/usr/share/man" "$mnt/usr/share/info" "$mnt/usr/share/lintian"
  mkdir -p "$mnt/etc/ssl/certs" "$mnt/home/nonroot" "$mnt/root" "$mnt/tmp"
  find "$mnt/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat > "$mnt/etc/ssl/certs/ca-certificates.crt"
  cat > "$mnt/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat > "$mnt/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  chown 65532:65532 "$mnt/home/nonroot"
  chmod 700 "$mnt/root" "$mnt/home/nonroot"
  chmod 1777 "$mnt/tmp"
  for sh in bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/dash; do
    if [ -e "$mnt/$sh" ]; then echo "base-images: $RUNTIME would have a shell ($sh)" >&2; exit 1; fi
  done
  bh umount "$ctr" >/dev/null
  bh config --user 65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$ctr"
  commit "$ctr" "$RUNTIME" "$runtime_key"
else
  echo "base-images: the stand-in $RUNTIME is up to date (key $runtime_key)"
fi
bh images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "rust|distroless" | sed 's/^/base-images: /'
