"""Trains or evaluates a CvT (flax examples/imagenet style entry point).

    python main.py --config=configs/fashion_mnist.py:variant=cvt_mini --workdir=/tmp/fmnist
    python main.py --config=configs/cifar100.py --workdir=/tmp/c100 --config.batch_size=256
    python main.py --config=configs/imagenet.py:variant=13 --workdir=/tmp/in1k --config.eval_only=True

Restarting the same command resumes from the workdir's latest checkpoint. On
several hosts, run the same command on each; ``jax.distributed.initialize()`` is
called when ``--distributed`` is given or the environment names a coordinator
(``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``),
a Cloud TPU pod or a SLURM/Open MPI job.
"""

import os
from collections.abc import Mapping

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and the run summary.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; auto-detected on pods).")
config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py[:args]).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def multi_host(distributed_flag: bool, env: Mapping[str, str]) -> bool:
    """Whether this process is one of several (explicit flag, coordinator env, TPU pod, SLURM or MPI job)."""
    if distributed_flag or any(env.get(k) for k in _MULTIHOST_ENV):
        return True
    return any(int(env.get(var) or 1) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def _hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only feeds data (tf.data): keep it off the GPUs/TPUs, which belong to JAX. TF is optional."""
    try:
        import tensorflow as tf
    except ImportError:
        return
    for kind in ("GPU", "TPU"):
        try:
            tf.config.experimental.set_visible_devices([], kind)
        except Exception as e:  # No such device type, or TF already initialised.
            logging.debug("TensorFlow: could not hide %s devices: %s", kind, e)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --config.<field>=<value> overrides.")
    _hide_accelerators_from_tensorflow()

    import jax

    if multi_host(FLAGS.distributed, os.environ):
        # Auto-detected on Cloud TPU, SLURM and Open MPI; elsewhere give JAX_COORDINATOR_ADDRESS (host:port),
        # JAX_NUM_PROCESSES and JAX_PROCESS_ID.
        env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                  ("process_id", "JAX_PROCESS_ID")) if os.environ.get(v)}  # fmt: skip
        jax.distributed.initialize(**env)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)  # fmt: skip

    from cvt_flax import train

    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a ``--config.<field>`` that the config lacks gets a message naming it and close fields."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):
        import difflib

        from configs import default

        fields = _flat_keys(default.get_config().to_dict())
        overrides = [a[len("--config.") :].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [o for o in overrides if o not in fields] or overrides[-1:]
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" Did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
            lines.append(f"FATAL: --config.{name} is not a config field.{hint}")
        lines.append("The fields are defined and documented in configs/default.py.")
        raise SystemExit("\n".join(lines)) from None


def _flat_keys(d: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]
    return out


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
