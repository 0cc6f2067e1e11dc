"""Run a training command under torchrun and return an exit code of ``ml.contract``.

The supervisor starts ``python -m ml.launch TORCHRUN_ARGS`` when a run uses more than
one process. The arguments are those of ``torchrun`` (``torch.distributed.run``), which
this module calls in-process, with two changes:

* ``--nproc-per-node=0`` starts one process per visible GPU, or one on a machine
  without GPUs (torchrun's own ``auto`` would start one per CPU there).
* torchrun's agent ignores SIGTERM. A spot notice or a shutdown makes the supervisor
  (or the operating system) send SIGTERM to the training processes themselves, which
  then save and exit with ``EXIT_SAVED``. Otherwise torchrun would react to SIGTERM by
  killing them after 30 s and exit with its own code.

torchrun reports only "failed" for any non-zero exit, so the exit codes of the
processes are mapped back: all saved gives ``EXIT_SAVED``, a lost peer (in a
collective or in the rendezvous) gives ``EXIT_PEER_LOST``, anything else is a crash.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from ml import contract

logger = logging.getLogger("ml.launch")

DETECT_PROCESS_COUNT = "--nproc-per-node=0"
EXIT_CRASH = 1


def resolve_process_count(argv: list[str]) -> list[str]:
    """Replace ``--nproc-per-node=0`` with the number of visible GPUs (at least 1)."""
    if DETECT_PROCESS_COUNT not in argv:
        return argv
    from ml.distributed import visible_process_count

    count = visible_process_count()
    logger.info("starting %d process(es) on this instance (one per visible GPU, or one)", count)
    return [f"--nproc-per-node={count}" if part == DETECT_PROCESS_COUNT else part for part in argv]


def exit_code_of_failures(codes: list[int]) -> int:
    """Map the exit codes of the failed training processes to one contract exit code.

    When one process exits, torchrun sends SIGTERM to the others on the instance. A
    process that was already past its save, in interpreter shutdown, dies of that
    signal (code -SIGTERM), so such codes count as the outcome of the other processes.
    """
    stopped_by_torchrun = -int(signal.SIGTERM)
    if codes and any(code != stopped_by_torchrun for code in codes):
        codes = [code for code in codes if code != stopped_by_torchrun]
    if not codes:
        return contract.EXIT_COMPLETED
    if all(code == contract.EXIT_SAVED for code in codes):
        return contract.EXIT_SAVED
    if all(code in (contract.EXIT_SAVED, contract.EXIT_PEER_LOST) for code in codes):
        return contract.EXIT_PEER_LOST
    for code in codes:
        if code not in (contract.EXIT_SAVED, contract.EXIT_PEER_LOST):
            # A process killed by a signal has a negative code in torchrun's report.
            return code if 0 < code < 256 else EXIT_CRASH
    return EXIT_CRASH


def _log_ignored_sigterm(signal_number: int, frame: object) -> None:
    logger.info("torchrun agent received SIGTERM; the training processes save and exit on their own")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    arguments = resolve_process_count(list(sys.argv[1:] if argv is None else argv))

    # torchrun installs handlers for the signals in this list when it starts the
    # processes; leaving SIGTERM out keeps the handler below.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    signal.signal(signal.SIGTERM, _log_ignored_sigterm)
    # The supervisor sends SIGUSR1 to the training processes only; a stray one must not
    # end the agent, whose default action for it is to terminate.
    signal.signal(contract.SIGNAL_SAVE_AND_CONTINUE, signal.SIG_IGN)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(arguments)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        code = exit_code_of_failures(codes)
        logger.info("training processes exited with %s; exit code %d", codes, code)
        return code
    except RendezvousError as error:
        logger.error("rendezvous failed (%s: %s); exit code %d", type(error).__name__, error,
                     contract.EXIT_PEER_LOST)
        return contract.EXIT_PEER_LOST
    return contract.EXIT_COMPLETED


if __name__ == "__main__":
    sys.exit(main())
