"""The ``quantize-jax`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from quantize_jax import demo

    demo.run(quick=args.quick)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="quantize-jax", description="4-bit quantization for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="int4 QAT on scikit-learn digits, then packed int4 serving")
    p.add_argument("--quick", action="store_true", help="a smaller run, for tests")
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
