"""Run the `vlfit` CLI and hit it with a real signal at a chosen moment (used by test_faults.py).

    python tests/fault_injection.py SIGNAL WHEN [TIMES] -- vlfit-arguments...

SIGNAL is a name (SIGKILL, SIGTERM, SIGINT); WHEN is `step:N` (inside the N-th optimizer step,
after the weights changed and before anything records that step) or `fsync:N` (at the N-th fsync,
i.e. part way through writing a checkpoint); TIMES is how often the signal is sent (default 1).
The process signals itself, so the moment is exact and a test can repeat it.
"""

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> None:
    sig_name, when, *rest = sys.argv[1:sys.argv.index("--")]
    times = int(rest[0]) if rest else 1
    sig = signal.Signals[sig_name]
    kind, n = when.split(":")
    calls = 0

    def hit(*_args, **_kwargs) -> None:
        nonlocal calls
        calls += 1
        if calls == int(n):
            for _ in range(times):
                os.kill(os.getpid(), sig)

    if kind == "step":
        register_optimizer_step_post_hook(hit)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            hit()
            return real_fsync(fd)

        os.fsync = fsync

    from vlfit.cli import main as vlfit_main

    sys.argv = ["vlfit", *sys.argv[sys.argv.index("--") + 1:]]
    vlfit_main()


if __name__ == "__main__":
    main()
