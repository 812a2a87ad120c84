"""The command line: ``python -m adaptive_sampling <command> [options]`` (also ``adaptive-sampling``).

* ``demo``: the main demo on a shipped learned model (``evaluation.demo``);
* ``tune``: calibrate, compare and get the verdict on your own diffusers pipeline (``evaluation.tune_cli``).
"""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("adaptive_sampling.evaluation.demo", "is skipping worth it? every policy against every baseline on a shipped model"),
    "tune": ("adaptive_sampling.evaluation.tune_cli", "calibrate, compare and get the verdict on your own diffusers pipeline"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: python -m adaptive_sampling <command> [options]   (or: adaptive-sampling <command>)", "", "commands:"]
        lines += [f"  {name:8s} {about}" for name, (_, about) in COMMANDS.items()]
        lines += ["", "`python -m adaptive_sampling <command> --help` describes a command's options."]
        text = "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}\n\n{text}", file=sys.stderr)
            return 2
        print(text)
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
