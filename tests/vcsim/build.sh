#!/bin/sh
# Builds the two vCenter simulators the tests run, from Debian's govmomi sources:
#   vcsim-upstream  govmomi's simulator as packaged (no ExportVm)
#   vcsim-nfc       a copy of that tree plus ExportVm (export_vm.go.in), Changed Block
#                   Tracking (cbt.go.in, called by CreateSnapshotTask) and upstream's
#                   one-line fix for the nil writer of GET /nfc/ (ServeNFC)
# Usage: tests/vcsim/build.sh OUTDIR   (skips what is already built)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/bin}" && cd "${1:-$here/bin}" && pwd)
gocode=/usr/share/gocode
mkdir -p "$out"
export GO111MODULE=off GOFLAGS=-mod=mod CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$out/.gocache}"
if [ ! -x "$out/vcsim-upstream" ] || [ "$here/main.go" -nt "$out/vcsim-upstream" ]; then
    GOPATH="$gocode" go build -o "$out/vcsim-upstream" "$here/main.go"
fi
if [ ! -x "$out/vcsim-nfc" ] || [ "$here/main.go" -nt "$out/vcsim-nfc" ] \
        || [ "$here/export_vm.go.in" -nt "$out/vcsim-nfc" ] \
        || [ "$here/cbt.go.in" -nt "$out/vcsim-nfc" ]; then
    tree="$out/gopath/src/github.com/vmware"
    rm -rf "$out/gopath" && mkdir -p "$tree"
    cp -r "$gocode/src/github.com/vmware/govmomi" "$tree/"
    sim="$tree/govmomi/simulator"
    sed -i 's/^\tvar dst io.Writer$/\tvar dst io.Writer = w/' "$sim/http_nfc_lease.go"
    grep -q 'var dst io.Writer = w' "$sim/http_nfc_lease.go"
    cp "$here/export_vm.go.in" "$sim/hypersdk_export_vm.go"
    cp "$here/cbt.go.in" "$sim/hypersdk_cbt.go"
    sed -i 's/^\t\tMap.Put(snapshot)$/&\n\t\tcbtSnapshotTaken(vm, snapshot)/' "$sim/virtual_machine.go"
    grep -q 'cbtSnapshotTaken(vm, snapshot)' "$sim/virtual_machine.go"
    GOPATH="$out/gopath:$gocode" go build -o "$out/vcsim-nfc" "$here/main.go"
fi
