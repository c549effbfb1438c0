"""The training command: ``python main.py`` in a checkout, ``cvt-train`` when installed.

    cvt-train --config=configs/fashion_mnist.py:epochs=1 --workdir=runs/fmnist
    cvt-train --config=configs/cifar100.py --workdir=runs/c100 --config.batch_size=256
    cvt-train --config=configs/imagenet.py:variant=13 --workdir=runs/in1k --config.eval_only=True

Restarting the same command resumes from the workdir's latest checkpoint. On several hosts, run the same command
on each; ``jax.distributed.initialize()`` is called when ``--distributed`` is given or the environment names a
coordinator (``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``), a Cloud TPU pod or
a SLURM/Open MPI job.

Bad input (an unknown flag or config field, a value of the wrong type, a missing file, a dataset that is not
there, a checkpoint of another model, a full disk...) ends with one message on stderr that says what to fix and
exit status 2; the traceback goes to ``<workdir>/error.log`` (``--verbose`` prints it too). Internal errors keep
their tracebacks.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from cvt_flax import errors, hostmem

FLAGS = flags.FLAGS
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_OWN_FLAGS = ("config", "workdir", "distributed", "verbose")
_NOT_CONFIGS = ("config_args.py", "offline_data.py", "__init__.py")


def _define_flags() -> None:
    if "workdir" in FLAGS:
        return
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, logs, metrics and the run summary (local or gs://bucket/path)."
    )
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; auto-detected on pods).")
    flags.DEFINE_bool("verbose", False, "Print tracebacks of user errors (they always go to <workdir>/error.log).")
    config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py[:args]).")


def multi_host(distributed_flag: bool, env: Mapping[str, str]) -> bool:
    """Whether this process is one of several (explicit flag, coordinator env, TPU pod, SLURM or MPI job)."""
    if distributed_flag or any(env.get(k) for k in _MULTIHOST_ENV):
        return True
    return any(int(env.get(var) or 1) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


# ----------------------------------------------------------------------------- help and flag errors


def _configs_dir(argv: Sequence[str]) -> pathlib.Path:
    """The configs folder: the one of ``--config`` when given, else the checkout's."""
    value = _flag_value(argv, "config")
    if value:
        path = pathlib.Path(value.split(":", 1)[0]).expanduser()
        if path.parent.is_dir():
            return path.parent.resolve()
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _first_doc_line(path: pathlib.Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def help_text(argv: Sequence[str] = ()) -> str:
    """``--help``: usage, the config files with their first docstring line, and how to override a field."""
    folder = _configs_dir(argv)
    files = sorted(p for p in folder.glob("*.py") if p.name not in _NOT_CONFIGS) if folder.is_dir() else []
    rel = os.path.relpath(folder) if folder.is_dir() else "configs"
    lines = [
        "Trains or evaluates a CvT (resumes from the workdir's latest checkpoint when restarted).",
        "",
        "usage: main.py (or cvt-train) --config=CONFIG.py[:key=value,...] --workdir=DIR [--config.FIELD=VALUE ...]",
        "               [--distributed] [--verbose]",
        "",
        f"Config files ({rel}/):",
    ]
    lines += [f"  {rel}/{p.name:18s} {_first_doc_line(p)}" for p in files] or ["  (none found)"]
    lines += [
        "",
        "Override any config field on the command line, e.g.",
        f"  --config={rel}/fashion_mnist.py:epochs=1 --config.batch_size=128 --config.learning_rate=1e-3",
        "  --config.aug.mixup_alpha=0 --config.init_from=runs/pretrained --config.eval_only=True",
        f"Every field is documented in {rel}/default.py; the options after ':' in each file's docstring.",
        "",
        "Flags:",
        "  --config       the config file, optionally with ':key=value,...' options",
        "  --workdir      folder for checkpoints, logs, metrics.jsonl, summary.json, curves.png (required); local or",
        "                 gs://bucket/path (Cloud Storage, e.g. on Cloud TPU; pip install 'cvt-flax[gcs]')",
        "  --distributed  call jax.distributed.initialize() (auto-detected on TPU pods, SLURM, Open MPI)",
        "  --verbose      print tracebacks of user errors (always written to <workdir>/error.log)",
    ]
    return "\n".join(lines) + "\n"


def _config_fields() -> list[str]:
    try:
        from configs import default

        return _flat_keys(default.get_config().to_dict())
    except ImportError:
        return []


def _flat_keys(d: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}"]
    return out


def _suggest(name: str, fields: list[str]) -> str:
    candidates = [f"--config.{f}" for f in fields] + [f"--{f}" for f in _OWN_FLAGS]
    leaves = {f"--config.{f}".rsplit(".", 1)[-1]: f"--config.{f}" for f in fields}
    close = difflib.get_close_matches(f"--{name}", candidates, n=2, cutoff=0.6)
    close += [leaves[m] for m in difflib.get_close_matches(name, list(leaves), n=2, cutoff=0.6)]
    close += [c for c in candidates if c.endswith(f"_{name}") or c.endswith(f".{name}")]
    close = list(dict.fromkeys(close))[:3]
    return f" Did you mean {' or '.join(close)}?" if close else ""


def _config_error(err: BaseException) -> str | None:
    """The message of an error raised while loading the config file (innermost cause), if it was that."""
    seen: BaseException | None = err
    while seen is not None:
        if errors.is_user_error(seen) and not isinstance(seen, flags.Error):
            return errors.message(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; every mistake ends in one message naming the fix (`errors.UserError`)."""
    _define_flags()
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
        sys.stdout.write(help_text(argv))
        raise SystemExit(0)
    config_value = _flag_value(argv, "config")
    if config_value:
        path = pathlib.Path(config_value.split(":", 1)[0]).expanduser()
        if not path.is_file():
            folder = _configs_dir(argv)
            known = ", ".join(sorted(p.name for p in folder.glob("*.py") if p.name not in _NOT_CONFIGS))
            raise errors.UserError(
                f"--config={config_value}: the file {path} does not exist. Config files in {folder}: {known}."
            )
        # Config files import their siblings as `configs.<name>`: make the folder above them importable.
        root = str(path.resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        rest = FLAGS(argv)
    except flags.UnrecognizedFlagError as err:
        fields = _config_fields()
        if err.flagname.startswith("config."):
            field = err.flagname[len("config.") :]
            close = difflib.get_close_matches(field, fields, n=3)
            hint = f" Did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
            raise errors.UserError(
                f"--config.{field} is not a config field.{hint} The fields are defined and documented in "
                "configs/default.py."
            ) from None
        raise errors.UserError(
            f"Unknown flag --{err.flagname}.{_suggest(err.flagname, fields)} Config fields are set as "
            "--config.<field>=<value>; see `main.py --help`."
        ) from None
    except (flags.IllegalFlagValueError, flags.Error) as err:
        inner = _config_error(err)
        if inner:
            raise errors.UserError(f"--config={config_value}: {inner}") from None
        text = str(err)
        if "workdir" in text and "None" in text:
            raise errors.UserError(
                "--workdir must have a value: the folder for checkpoints, logs and results, e.g. --workdir=runs/fmnist."
            ) from None
        if "--config=None" in text or ("config" in text and "must have a value" in text):
            raise errors.UserError(
                "--config must have a value, e.g. --config=configs/fashion_mnist.py:epochs=1 (see `main.py --help`)."
            ) from None
        raise errors.UserError(text.replace("flag --", "--", 1)) from None
    except (KeyError, AttributeError) as err:
        # ml_collections: an override of a field the config lacks.
        name = str(err).strip("'\"")
        overrides = [a[len("--config.") :].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        fields = _config_fields()
        unknown = [o for o in overrides if o not in fields] or overrides[-1:] or [name]
        lines = []
        for field in unknown:
            close = difflib.get_close_matches(field, fields, n=3)
            hint = f" Did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
            lines.append(f"--config.{field} is not a config field.{hint}")
        lines.append("The fields are defined and documented in configs/default.py.")
        raise errors.UserError("\n".join(lines)) from None
    except Exception as err:
        inner = _config_error(err)
        if inner:
            raise errors.UserError(f"--config={config_value}: {inner}") from None
        raise
    if FLAGS.workdir is None:
        raise errors.UserError(
            "--workdir must have a value: the folder for checkpoints, logs and results, e.g. --workdir=runs/fmnist."
        )
    if FLAGS.config is None:
        raise errors.UserError(
            "--config must have a value, e.g. --config=configs/fashion_mnist.py:epochs=1 (see `main.py --help`)."
        )
    return rest


# ----------------------------------------------------------------------------- the run


def _hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only feeds data (tf.data): keep it off the GPUs/TPUs, which belong to JAX. TF is optional."""
    with errors.silenced_stderr():
        try:
            import tensorflow as tf
        except ImportError:
            return
        for kind in ("GPU", "TPU"):
            try:
                tf.config.experimental.set_visible_devices([], kind)
            except Exception as e:  # No such device type, or TF already initialised.
                logging.debug("TensorFlow: could not hide %s devices: %s", kind, e)


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise errors.UserError(f"Unexpected arguments {list(argv[1:])}; use --config.<field>=<value> overrides.")
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


def _error_log(argv: Sequence[str]) -> pathlib.Path:
    """Where a user error's traceback goes: ``<workdir>/error.log`` for a local workdir folder, else a temp file.

    A Cloud Storage workdir (``gs://``) gets no error.log: the error may be that it cannot be reached.
    """
    from cvt_flax import paths

    workdir = _flag_value(argv, "workdir")
    if workdir and not paths.is_remote(workdir) and pathlib.Path(workdir).expanduser().is_dir():
        return pathlib.Path(workdir).expanduser() / "error.log"
    return pathlib.Path(tempfile.gettempdir()) / f"cvt_flax_error_{os.getpid()}.log"


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``main.py`` and ``cvt-train``."""
    if argv is None:
        # On Linux, first restart with huge pages for the allocator (faster on XLA's CPU backend; see hostmem).
        hostmem.reexec_with_huge_pages()
    # TensorFlow's C++ start-up notes (oneDNN, CPU features) are not for this console; warnings still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    argv = list(sys.argv if argv is None else argv)
    verbose = "--verbose" in argv

    def parser(args: list[str]) -> list[str]:
        try:
            return parse_flags(args)
        except errors.UserError as err:
            raise SystemExit(errors.report(err, verbose=verbose)) from None

    def main(args: list[str]) -> None:
        from cvt_flax import writers

        writers.quiet_console()
        try:
            _main(args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - user errors become one message; the rest re-raises
            code = errors.report(err, log_file=_error_log(argv), verbose=verbose)
            # Leave now: writer threads and exit hooks of the libraries (a TensorBoard writer flushing to a full
            # disk, Orbax's event loops) would print their own tracebacks of the same failure on the way out.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    app.run(main, argv=argv, flags_parser=parser)
    raise SystemExit(0)
