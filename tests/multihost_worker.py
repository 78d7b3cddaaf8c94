"""One process of a multi-process demo run (launched by tests/test_multihost.py, two at a time, on CPU with gloo).

    python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=PORT --output_dir=DIR [--exit_after=K]

Each process has two CPU devices (``--xla_force_host_platform_device_count=2``, set before JAX starts), starts the
distributed runtime on 127.0.0.1:PORT, runs :func:`tiny_config`'s demo run and writes what ``run`` returned to
``DIR/returned.process<k>.json``. ``--exit_after=K`` ends the process abruptly (``os._exit``) once K of its images are
logged: a crash mid-run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(output_dir: str):
    """The demo run both sides of the test make: 7 images in batches of 3, i.e. 4 slots on two devices (the shares
    of 4 and 3 images one batch each, the second padded), the handcrafted backbone at 64 px, SPARK's settings for
    the demo's planted regions."""
    from spark_jax.config import SparkConfig
    from spark_jax.methods.spark import SparkMethodConfig
    from spark_jax.runner import RunConfig

    return RunConfig(dataset="demo", backbone="handcrafted", resolution=64, mask_size=32, batch_size=3, demo_images=7,
                     demo_photos=False, num_overlays=1, output_dir=output_dir,
                     method_config=SparkMethodConfig(spark=SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--exit_after", type=int, default=None)
    args = parser.parse_args()

    from spark_jax.distributed import DistributedConfig, initialize
    from spark_jax.runner import run

    initialize(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{args.port}",
                                 num_processes=args.num_processes, process_id=args.process_id))
    finished = []

    def on_image(image_id: str) -> None:
        finished.append(image_id)
        if args.exit_after is not None and len(finished) >= args.exit_after:
            os._exit(3)  # no cleanup, no goodbye to the other process: a crash

    metrics = run(tiny_config(args.output_dir), quiet=True, on_image=on_image)
    with open(os.path.join(args.output_dir, f"returned.process{args.process_id}.json"), "w") as f:
        json.dump({"metrics": metrics, "finished": finished}, f)


if __name__ == "__main__":
    # Before JAX starts, whatever the parent set; only here: test_multihost imports this module (tiny_config), and
    # setting it at import would give the whole pytest process two devices.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    main()
