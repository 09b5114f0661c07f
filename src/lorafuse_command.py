"""The `lorafuse` command's entry point. It lives outside the lorafuse package so that it runs before the
package's own imports (numpy and the merge machinery, most of the command's first tenth of a second).

Ctrl-C must end the command with one line and exit code 130 at every moment. Until lorafuse.cli.main
runs there is nothing to clean up, so SIGINT ends the process at once; while it runs, it raises
KeyboardInterrupt, so that cleanups run and the command reports what was kept, and then the process ends
at once; once it has returned otherwise, SIGINT only cuts the interpreter's shutdown short and the command's
exit code stands.
"""

import gc
import os
import sys
import signal


def main() -> int:
    _hold_closed_descriptors()
    try:
        from lorafuse.cli import main as command

        code = command()
    except KeyboardInterrupt:  # one that came while the command was reporting another ending
        _on_sigint(130, b"")
        os.write(2, b"lorafuse: interrupted\n")
        code = 130
    if code == 130:
        # Interrupted: what had to be cleaned up was. Threads still running are not waited for: one may be
        # stuck for good in an import that the KeyboardInterrupt broke in the main thread.
        os._exit(code)
    _on_sigint(code, b"")
    # The interpreter's collections at exit would walk every object numpy, the Hub client and the merge
    # made, to free memory the process is about to give back: frozen, they are left alone (what reference
    # counting frees still goes as the modules are torn down, and the standard streams are flushed as ever).
    gc.freeze()
    return code


def _hold_closed_descriptors() -> None:
    """With stdout or stderr closed from the start (`>&-`, `2>&-`), the first files the command opens (the
    lock, a shard being written) would get descriptors 1 and 2, and whatever writes there (a C library's
    warning) would land in them: /dev/null holds their place. sys.stdout and sys.stderr stay None, so the
    command knows that no one reads them."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _on_sigint(code: int, line: bytes) -> None:
    """From now on SIGINT writes `line` to stderr and ends the process with `code`, unless SIGINT is
    ignored (as for a job started in the background), which stays so."""

    def leave(signum, frame):
        try:
            os.write(2, line)
        finally:
            os._exit(code)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, leave)


_on_sigint(130, b"lorafuse: interrupted\n")  # on import: the console script imports this module, then calls main


if __name__ == "__main__":  # python -m lorafuse_command, as the console script runs it
    sys.exit(main())
