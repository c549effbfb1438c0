"""Trains or evaluates a CvT (flax examples/imagenet style entry point; ``cvt-train`` when installed).

    python main.py --config=configs/fashion_mnist.py:variant=cvt_mini --workdir=/tmp/fmnist
    python main.py --config=configs/cifar100.py --workdir=/tmp/c100 --config.batch_size=256
    python main.py --config=configs/imagenet.py:variant=13 --workdir=/tmp/in1k --config.eval_only=True
    python main.py --help

The command itself lives in `cvt_flax.cli` (flags, error messages, multi-host start-up).
"""

from cvt_flax.cli import multi_host, run

__all__ = ["multi_host", "run"]

if __name__ == "__main__":
    run()
