"""Every command in the README and docs/ is current: each line of each ``bash`` block is run in the
cheapest form that proves it (docs/testing.md). A Python command line has its arguments parsed by
the command's own parser, a training or planning command its recipe and overrides validated (for
the world size it names), ``./launch.sh`` runs with ``--dry-run``, ``make`` with ``-n``; the files
a command names in the repository must exist. Hub ids and GPU-only commands are only parsed."""
from __future__ import annotations

import configparser
import importlib
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
# commands of other tools the documentation tells a user to run: the network or a GPU machine's
EXTERNAL = {"cd": None, "export": None, "hf": {"auth"}, "tensorboard": None, "git": {"clone"}}
PYTHONS = {"python", "python3", ".venv/bin/python"}


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(``file:line``, argv) of every command in the file's ``bash`` blocks; ``\\`` continues a line,
    ``&&`` separates commands, ``#`` starts a comment."""
    found, block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv, pending = shlex.split(pending + line, comments=True), ""
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            found.append((f"{path.relative_to(REPO)}:{start}", argv[:cut]))
            argv = argv[cut + 1:]
    return found


COMMANDS = [command for doc in DOCS for command in shell_commands(doc)]


def test_the_documentation_holds_commands_and_every_doc_is_read():
    assert len(DOCS) >= 12 and len(COMMANDS) >= 60
    assert {Path(where.split(":")[0]).name for where, _ in COMMANDS} >= {"README.md", "gpu-walkthrough.md"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w} {' '.join(a)[:60]}" for w, a in COMMANDS])
def test_every_documented_command_is_current(where, argv, tmp_path):
    program, args = argv[0], argv[1:]
    if program in PYTHONS or program == "torchrun":
        check_python(args if program != "torchrun" else args[args.index("-m"):])
    elif program == "./launch.sh":
        check_launch(args, tmp_path)
    elif program == "make":
        done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    elif program.endswith("pip"):
        assert args[0] == "install" and args[1] == "-r" and (REPO / args[2]).is_file(), args
    elif program in EXTERNAL:
        allowed = EXTERNAL[program]
        assert allowed is None or args[0] in allowed, f"{where}: {program} {args[0]} is not a documented use"
        if program == "git":
            assert args[1].startswith("https://github.com/"), args
    else:
        pytest.fail(f"{where}: no check for {program!r}; add one to tests/unit/test_doc_commands.py")


def check_python(args: list[str]) -> None:
    if args[0] == "-c":
        compile(args[1], "<doc>", "exec")
        return
    assert args[0] == "-m", args
    module, rest = args[1], args[2:]
    if module == "pytest":
        markers = configparser.ConfigParser()
        markers.read(REPO / "pytest.ini")
        known = {line.split(":")[0].strip() for line in markers["pytest"]["markers"].strip().splitlines()}
        assert all(rest[i + 1] in known for i, a in enumerate(rest) if a == "-m"), rest
        return
    parsed = parse(module, rest)
    if parsed is None:                      # --help
        return
    if module in ("pipeline.train", "pipeline.plan"):
        world = parsed.nodes * parsed.gpus_per_node if module == "pipeline.plan" else 1
        recipe(parsed.config, parsed.overrides, world)
    if module == "data_prep" and parsed.command == "build":
        from data_prep.sources import parse_source_spec

        for spec in parsed.source:
            parse_source_spec(spec)


def parse(module: str, args: list[str]):
    """The module's own parser (``build_parser``) on the documented arguments (None: ``--help``)."""
    try:
        return _parsed(module, args)
    except SystemExit as stop:
        if stop.code:
            pytest.fail(f"python -m {module} {' '.join(args)}: its parser refused the documented arguments")
        return None


def _parsed(module: str, args: list[str]):
    if module == "benchmarks":
        from benchmarks.__main__ import BENCHMARKS, build_parser

        if args[1:] == ["--help"]:          # the benchmark's own help
            return importlib.import_module(BENCHMARKS[args[0]][0]).build_parser().parse_args(["--help"])
        ns, rest = build_parser().parse_known_args(args)
        target, _, takes_options = BENCHMARKS[ns.which]
        assert takes_options or not rest, rest
        return importlib.import_module(target).build_parser().parse_args(rest) if rest else ns
    cli = importlib.import_module(module)
    if not hasattr(cli, "build_parser"):    # a package's command line: its __main__
        cli = importlib.import_module(f"{module}.__main__")
    return cli.build_parser().parse_args(args)


def recipe(config: str | None, overrides: list[str], world: int) -> None:
    """The recipe loads, every override is a known key with a valid value, and the batch divides."""
    from pipeline.engine.config import for_world, load_config

    path = str(REPO / config) if config else None
    if path:
        assert Path(path).is_file(), config
    for_world(load_config(path, [o for o in overrides if "=" in o]), world)


def check_launch(args: list[str], tmp_path: Path) -> None:
    if "--hostfile" in args:                # the user's own file: one stands in for it
        at = args.index("--hostfile") + 1
        (tmp_path / "hosts.txt").write_text("node1 slots=8\nnode2 slots=8\n")
        args = [*args[:at], str(tmp_path / "hosts.txt"), *args[at + 1:]]
    done = subprocess.run(["bash", "launch.sh", *args, *([] if "--dry-run" in args else ["--dry-run"])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stage = args[1] if args[0] == "slurm" else args[0]
    if stage == "train":
        config = args[args.index("--config") + 1]
        nodes = int(args[args.index("--nodes") + 1]) if "--nodes" in args else 1
        gpus = int(args[args.index("--gpus-per-node") + 1]) if "--gpus-per-node" in args else 1
        recipe(config, [a for a in args if "=" in a and not a.startswith("-")], nodes * gpus)
