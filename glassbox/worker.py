"""Every rank of a tensor-parallel engine started by torchrun, on one host or several:

    # host A (rank 0: schedules, serves HTTP)                # host B
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 \\    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 \\
      --master-addr A --master-port 29500 \\                    --master-addr A --master-port 29500 \\
      -m glassbox.worker serve --host 0.0.0.0                  -m glassbox.worker serve --host 0.0.0.0

Rank 0 runs the glassbox command line it is given (`serve` or `generate`; --tensor-parallel-size defaults to
torchrun's WORLD_SIZE); every other rank joins the group and runs rank 0's model calls
(engine/tp_worker.py) with the --device of the same command line. Every rank reads the model from the path
rank 0 names: the same path must hold it on every host.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("glassbox.worker: error: start it with torchrun (RANK and WORLD_SIZE are not set)", file=sys.stderr)
        return 2
    if int(os.environ["RANK"]) == 0:
        from glassbox.cli import main as cli_main

        if "--tensor-parallel-size" not in argv and argv[:1] in (["serve"], ["generate"]):
            argv += ["--tensor-parallel-size", os.environ["WORLD_SIZE"]]
        return cli_main(argv)
    from glassbox.engine.tp_group import TensorParallelGroup
    from glassbox.engine.tp_worker import run_rank

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu")
    args, _ = device.parse_known_args(argv)
    return run_rank(TensorParallelGroup.from_environment(args.device), int(os.environ["RANK"]))


if __name__ == "__main__":
    sys.exit(main())
