"""The Xen test host's command runner, run by dom0's /init on its console (hvc0): the tests' hands in dom0.

Standard library only: it runs under dom0's own python3. The console loses
characters: Xen drops serial input while dom0 is too busy to take it (a
small ring, no flow control), so every line the host sends is short and
checked, and acknowledged before the next:

- ``P <id> <n> <crc32> <piece>``: piece ``n`` of request ``id``'s base64
  text; answered ``@@ACK <id> <n>`` (kept, or already had) or ``@@NAK <id>
  <n>`` (its CRC-32 does not match: the host sends it again).
- ``E <id> <pieces> <crc32>``: the request is whole (``pieces`` pieces whose
  joined text has that CRC-32); answered ``@@GOT <id>`` and, once the
  command ran, ``@@WP <id> <crc32> <base64 of {"rc", "stdout", "stderr"}>``,
  or ``@@NAK <id> E`` when the pieces do not add up.
- ``AGAIN <id>``: the answer once more (the host could not read it).

A request is JSON ``{"command": SHELL TEXT, "timeout": SECONDS}``; the
command runs under ``/bin/sh -c`` (rc -9 after the timeout, its process
group killed). Everything else on the console (Xen's and the kernel's lines)
holds no ``@@``, so the host picks the answers out of the stream.

A test host only: whoever can write to the console runs anything as root in
dom0, which is a throwaway VM of the test's own.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import termios
import zlib

#: Answers kept for AGAIN (the last ones only: the host asks again at once or not at all).
KEEP_ANSWERS = 16


def _quiet_console() -> None:
    """No echo of what the host sends (it would double the traffic), no CR/LF rewriting of input."""
    try:
        attrs = termios.tcgetattr(0)
    except termios.error:
        return  # not a terminal (a test of the agent itself)
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    attrs[0] &= ~(termios.ICRNL | termios.IXON)
    termios.tcsetattr(0, termios.TCSANOW, attrs)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def _run(request: dict) -> dict:
    process = subprocess.Popen(["/bin/sh", "-c", request["command"]], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=request.get("timeout", 60))
        rc = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        rc = -9
    return {"rc": rc, "stdout": stdout.decode(errors="replace"), "stderr": stderr.decode(errors="replace")}


def main() -> None:
    """Answer requests from the console until it closes."""
    _quiet_console()
    pieces: dict[str, list[str]] = {}
    answers: dict[str, str] = {}
    _say("workspace-pilot xen dom0 agent ready")
    for raw in sys.stdin.buffer:
        words = raw.decode(errors="replace").strip().split(" ")
        kind = words[0]
        if kind == "P" and len(words) == 5 and words[2].isdigit():
            ident, n, crc, piece = words[1], int(words[2]), words[3], words[4]
            have = pieces.setdefault(ident, [])
            if _crc(piece) != crc or n > len(have):
                _say(f"@@NAK {ident} {n}")
                continue
            if n == len(have):
                have.append(piece)
            _say(f"@@ACK {ident} {n}")
        elif kind == "E" and len(words) == 4 and words[2].isdigit():
            ident = words[1]
            if ident in answers:  # the host did not see GOT: the request ran already
                _say(f"@@GOT {ident}")
                _say(answers[ident])
                continue
            text = "".join(pieces.get(ident, []))
            if len(pieces.get(ident, [])) != int(words[2]) or _crc(text) != words[3]:
                _say(f"@@NAK {ident} E")
                continue
            del pieces[ident]
            _say(f"@@GOT {ident}")
            try:
                result = _run(json.loads(base64.b64decode(text)))
            except ValueError as exc:
                result = {"rc": -1, "stdout": "", "stderr": f"unreadable request: {exc}"}
            encoded = base64.b64encode(json.dumps(result).encode()).decode()
            answers[ident] = f"@@WP {ident} {_crc(encoded)} {encoded}"
            while len(answers) > KEEP_ANSWERS:
                answers.pop(next(iter(answers)))
            _say(answers[ident])
        elif kind == "AGAIN" and len(words) == 2 and words[1] in answers:
            _say(answers[words[1]])


if __name__ == "__main__":
    main()
