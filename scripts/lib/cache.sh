# What the build scripts share: whether a built directory in .cache is built (its "inputs" file says what it was
# built from and its files match its SHA256SUMS manifest), putting one in place, and which kernel a kernel
# meta-package means. Sourced, not run.

# cache_built DIR WANT: true if DIR was built from WANT and its files are intact.
cache_built() {
  [ -f "$1/inputs" ] && [ "$(cat "$1/inputs")" = "$2" ] && [ -f "$1/SHA256SUMS" ] &&
    (cd "$1" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1)
}

# cache_install DIR WANT FROM FILE...: move the FILEs from directory FROM into DIR, then write the manifest
# and the inputs last, so a half-done build is never taken for a finished one.
cache_install() {
  local dir=$1 want=$2 from=$3
  shift 3
  mkdir -p "$dir"
  rm -f "$dir/SHA256SUMS" "$dir/inputs"
  local name
  for name in "$@"; do
    mv "$from/$name" "$dir/"
  done
  (cd "$dir" && sha256sum "$@" > SHA256SUMS)
  echo "$want" > "$dir/inputs"
}

# kernel_of FLAVOUR: "<package> <version>" of the kernel the candidate linux-image-FLAVOUR depends on (e.g.
# "linux-image-6.1.0-57-amd64 6.1.192-3" for amd64), after an apt-get update when apt knows none yet and we are
# root; empty when apt still knows none.
kernel_of() {
  local flavour=$1 found
  _kernel_depends() {
    apt-cache show --no-all-versions "linux-image-$1" 2>/dev/null |
      sed -n "s/^Depends: .*\(linux-image-[^ ,]*-$1\) (= \([^)]*\)).*/\1 \2/p" | head -n 1
  }
  found=$(_kernel_depends "$flavour")
  if [ -z "$found" ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq  # no package lists yet (a fresh container)
    found=$(_kernel_depends "$flavour")
  fi
  echo "$found"
}
