#!/usr/bin/env python3
"""A minimal QMP client for the VM tests.

    qmp.py SOCKET COMMAND [JSON-ARGUMENTS]   run one command, print its return
    qmp.py SOCKET wait-migration TIMEOUT     poll query-migrate until the
                                             migration completed (exit 0) or
                                             failed/was cancelled or TIMEOUT
                                             seconds passed (exit 1); print
                                             the last answer

Every socket operation has a timeout; errors go to stderr with exit 1.
"""
import json
import socket
import sys
import time

IO_TIMEOUT = 30


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""
        self.read()  # the greeting
        self.execute("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("QMP socket closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{command}: {r['error'].get('desc', r['error'])}")
            return r.get("return")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, command = sys.argv[1], sys.argv[2]
    try:
        q = Qmp(path)
        if command == "wait-migration":
            deadline = time.monotonic() + float(sys.argv[3])
            while True:
                r = q.execute("query-migrate")
                status = r.get("status")
                if status == "completed":
                    print(json.dumps(r))
                    return
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    print(json.dumps(r))
                    sys.exit(f"qmp.py: migration {status or 'not started'}"
                             f"{'' if status in ('failed', 'cancelled') else ' at the timeout'}"
                             f": {r.get('error-desc', '')}")
                time.sleep(0.5)
        args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
        print(json.dumps(q.execute(command, args)))
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        sys.exit(f"qmp.py {path} {command}: {e}")


if __name__ == "__main__":
    main()
