"""A FAKE of Xen's `xl` for tests and benchmarks; see install_fake_xl in tests/support/fakes/__init__.py."""
# FAKE xl (Xen cannot run here): implements only `list 0` and `mem-set 0 <N>m`; Domain-0's MB live in fake-xl.state.
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
state = os.path.join(here, "fake-xl.state")
MAX_MB = 8192
args = sys.argv[1:]
if args == ["list", "0"]:
    mb = int(open(state).read())
    print("Name                                        ID   Mem VCPUs\tState\tTime(s)")
    print(f"Domain-0                                     0  {mb:4d}     4     r-----    1234.5")
elif len(args) == 3 and args[:2] == ["mem-set", "0"] and args[2].endswith("m") and args[2][:-1].isdigit():
    mb = int(args[2][:-1])
    if mb > MAX_MB:
        print("libxl: error: libxl_mem.c:123:libxl_set_memory_target: memory_dynamic_max must be less than or equal to memory_static_max", file=sys.stderr)
        print(f"cannot set domid 0 memory to {mb} MB: above the maximum {MAX_MB} MB", file=sys.stderr)
        sys.exit(1)
    with open(state, "w") as handle:
        handle.write(str(mb))
else:
    print(f"fake-xl: unsupported arguments {args}", file=sys.stderr)
    sys.exit(2)
