# What the build scripts share about a built directory in .cache: it is built when its "inputs" file says
# what it was built from and its files match its SHA256SUMS manifest. Sourced, not run.

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
