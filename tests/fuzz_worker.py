"""A worker process for tests/test_fuzz.py: runs the fuzz cases (tests/fuzz_cases.py) it is sent, one
after another, and answers each with ("ok" | "fail" | "error", text). Many cases share one process
(the import of torch and lowbit is paid once); a case that crashes the process (SIGSEGV, abort, an
ASan report) ends it, and the test that sent the case fails with it.

Protocol on stdin / the original stdout: 8-byte little-endian length + pickle of (name, kwargs), and
the same framing for the answer. Anything else written to stdout (native code, warnings) is sent to
stderr, so it cannot corrupt the protocol.
"""

import os
import pickle
import struct
import sys
import traceback
import warnings


def main() -> None:
    answers = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fuzz_cases import CASES

    requests = sys.stdin.buffer
    while True:
        head = requests.read(8)
        if len(head) < 8:
            return
        name, kwargs = pickle.loads(requests.read(struct.unpack("<Q", head)[0]))
        try:
            CASES[name](**kwargs)
            answer = ("ok", "")
        except AssertionError as e:
            answer = ("fail", f"{e}\n{traceback.format_exc(limit=8)}")
        except BaseException as e:  # noqa: BLE001 - any other exception is the finding
            answer = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
        data = pickle.dumps(answer)
        answers.write(struct.pack("<Q", len(data)) + data)


if __name__ == "__main__":
    main()
