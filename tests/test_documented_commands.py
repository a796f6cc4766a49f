"""Every command shown in README.md and docs/*.md runs, shrunk, so a documented command cannot break
unnoticed.

The commands are extracted from the documents' fenced code blocks (a newly documented command is picked
up by itself; a block may be indented, inside a list item), `\\` continuations joined, comments dropped,
except a trailing `# exits N: why`: such a command is documented to fail (e.g. a parity check catching an
injected fault) and must exit with N, not 0. Each document's commands run in order in one
folder of their own (train before eval/export of the same run folder), with configs/, benchmarks/ and
examples/ copied in, so every relative output path (`runs/...`, `out.json`, `plots`) lands in tmp_path.

Shrinking changes sizes only: a config gets `shrink_overrides` (tests/test_shipped_configs.py: 1 step,
tiny width, 2 channels per group); a bench sweep gets its smallest size from BENCH_SIZES; a Slurm
script runs with `srun` and `scontrol` faked, on one node, at the layout of SBATCH_LAYOUTS. Both tables
are reviewed by hand: a documented command that none of the rules can run fails the test (never a
silent skip). `dchag ...` runs in-process through `dchag.cli.main`; torchrun and sbatch lines run as
real processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_shipped_configs import shrink_overrides

from dchag.cli import main

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COPIED = ("configs", "benchmarks", "examples")  # what the commands read, by relative path
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PROGRAMS = {"dchag", "torchrun", "python", "sbatch", "make"}
OUT_OF_SCOPE = {"make"}  # `make demo` / `make test`: the demo is minutes long; `make test` runs this suite
BIN = Path(sys.executable).parent

# The smallest size of each documented sweep: `dchag bench --sweep NAME ...` gets these `--set` values
# (after any documented ones). Keyed by (sweep, --simulate-tp or None). A sweep documented without an
# entry here fails the test.
BENCH_SIZES: dict[tuple[str, int | None], list[str]] = {
    ("fused-cpu", None): [
        "channels=24", "embed_dim=32", "heads=4", "img_size=[16, 16]", "depth=1", "repeats=1", "warmup=0",
        "paper_scale=false",
    ],
    ("channel-parallel-cpu", None): ["channels=16", "embed_dim=32", "heads=4", "img_size=[16, 16]", "tp=[2]"],
    ("tp-comm-cpu", None): ["channels=8", "embed_dim=32", "heads=4", "img_size=[8, 16]", "depth=1", "tp=[2]"],
    ("paper-cpu", None): ["quick=true"],  # 16 channels, tp 2, width 32, depth 1 (PaperSize.resolved)
    # quick's 4 heads do not split 8 ways: the quick sizes with 8 heads, one rank of tp = 8
    ("paper-cpu", 8): ["channels=16", "img_size=[16, 32]", "embed_dim=64", "heads=8", "depth=1", "timed_steps=1"],
    ("paper-cpu", 4): ["quick=true"],  # quick's 4 heads split 4 ways: one rank of tp = 4
    ("paper-plan", None): ["quick=true"],  # the paper table's first row at depth 1, no 7B part
    ("cp-cpu", None): ["quick=true"],  # one 16 x 32 image at cp 2, width 32, depth 1 (CPSize.resolved)
    # every variant (the table's ratios to flat), one seed of 1 step on the documented config
    ("accuracy-cpu", None): ["steps=1", "seeds=[0]", "max_seeds=0", "val_samples=2"],
}  # fmt: skip

# `dchag probe --set` values: a probe config's patch counts and bootstrap resamples, cut
PROBE_SIZES = ["classifier.max_train_patches=2000", "classifier.max_test_patches=2000", "bootstrap=10"]

# Slurm scripts: (processes on the one node, function of the documented script arguments -> arguments
# to run). Each keeps the kinds of parallelism the documented layout has, at the smallest sizes.
SBATCH_LAYOUTS = {
    # CONFIG OUT KEY=VALUE...: tp x dp_shard stays tp x dp_shard, 2 x 2 on 4 processes
    "examples/slurm/train.sbatch": (
        4,
        lambda a: [a[0], a[1], *a[2:], *shrink_overrides(ROOT / a[0]), "parallel.tp=2", "parallel.dp_shard=2"],
    ),
    # CONFIG NPROC KEY=VALUE...: tp = NPROC becomes tp = 2
    "examples/slurm/check-parity.sbatch": (
        1,
        lambda a: [a[0], "2", *a[2:], *shrink_overrides(ROOT / a[0]), "parallel.tp=2"],
    ),
}

# Example scripts documented with torchrun, each of which runs in seconds as documented (reviewed by hand:
# a script not listed here fails the test)
EXAMPLE_SCRIPTS = {"examples/hf_vit_front_end/train.py"}


@dataclass(frozen=True)
class Command:
    document: str  # path relative to the repository
    line: int  # where the command starts in the document
    text: str  # as documented, continuations joined, comment dropped
    env: tuple[tuple[str, str], ...]  # leading VAR=value assignments
    argv: tuple[str, ...]
    exits: int = 0  # the exit code the document states (`# exits N: why`); 0 when it states none


EXPECTED_EXIT = re.compile(r"(?:^|\s)#\s*exits\s+(\d+)\b")  # a trailing comment `# exits N: why`


def extract_commands(text: str, document: str) -> list[Command]:
    """The shell commands in `text`'s fenced code blocks (yaml and other data blocks are skipped; in a
    shell block every line is a command or a comment)."""
    commands = []
    for block in re.finditer(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", text, flags=re.M | re.S):
        indent, language, body = len(block.group(1)), block.group(2).lower(), block.group(3)
        first_line = text[: block.start(3)].count("\n") + 1
        lines, start, pending = [], 0, ""
        for i, line in enumerate(body.splitlines()):
            line = line[indent:] if line[:indent].isspace() else line
            if not pending:
                start = first_line + i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + line))
            pending = ""
        for number, line in lines:
            plain = [w for w in line.split() if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]
            if language not in SHELL_BLOCKS and (not plain or plain[0] not in PROGRAMS):
                continue  # a diagram, a file tree, data
            words = shlex.split(line, comments=True)
            env = []
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                env.append(tuple(words.pop(0).split("=", 1)))
            if not words:
                continue
            if language in SHELL_BLOCKS or words[0] in PROGRAMS:
                text_ = " ".join(shlex.quote(w) for w in [*(f"{k}={v}" for k, v in env), *words])
                exits = EXPECTED_EXIT.search(line)
                command = Command(document, number, text_, tuple(env), tuple(words), int(exits[1]) if exits else 0)
                commands.append(command)
    return commands


def documented_commands() -> list[Command]:
    return [c for doc in DOCUMENTS for c in extract_commands(doc.read_text(), str(doc.relative_to(ROOT)))]


def _with_set(args: list[str], extra: list[str]) -> list[str]:
    """`args` with `extra` appended to its `--set` values (argparse keeps only the last `--set`)."""
    if "--set" not in args:
        return [*args, "--set", *extra]
    i = args.index("--set") + 1
    while i < len(args) and not args[i].startswith("--"):
        i += 1
    return [*args[:i], *extra, *args[i:]]


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def validation_subset(path: Path, folder: Path) -> Path:
    """The points of a paper-cpu result the test validates: D-CHAG-L at the smallest channel count at
    tp = 2, fused and not (2 of 84 points; each is one traced step)."""
    data = json.loads(path.read_text())
    if data["meta"]["sweep"] == "cp-cpu":  # the smallest image at the smallest cp > 1 (one traced step)
        key = min((r["height"], r["cp"]) for r in data["records"] if r["cp"] > 1)
        subset = folder / f"subset-{path.name}"
        keep = [r for r in data["records"] if (r["height"], r["cp"]) == key]
        subset.write_text(json.dumps({**data, "records": keep}))
        return subset
    smallest = min(r["channels"] for r in data["records"])
    keep = [r for r in data["records"] if (r["variant"], r["tp"], r["channels"]) == ("dchag-L", 2, smallest)]
    assert keep, f"{path} has no dchag-L point at tp 2: change validation_subset"
    subset = folder / f"subset-{path.name}"
    subset.write_text(json.dumps({**data, "records": keep}))
    return subset


def shrink_dchag(args: list[str], folder: Path) -> list[str]:
    """The arguments of one `dchag` command (after `dchag` / `-m dchag`), shrunk in size only."""
    sub = args[0] if args else ""
    if sub in ("train", "check-parity"):
        config = _option(args, "--config")
        if config is None:
            raise LookupError(f"`dchag {sub}` without --config: add a shrinking rule for the built-in defaults")
        return _with_set(args, shrink_overrides(ROOT / config))
    if sub == "bench":
        sweep, simulate = _option(args, "--sweep"), _option(args, "--simulate-tp")
        key = (sweep, int(simulate) if simulate else None)
        if key not in BENCH_SIZES:
            raise LookupError(f"bench sweep {key} has no smallest size in BENCH_SIZES: add one")
        return _with_set(args, BENCH_SIZES[key])
    if sub == "plan" and "--validate" in args:
        i = args.index("--validate") + 1
        return [*args[:i], str(validation_subset(Path(args[i]), folder)), *args[i + 1 :]]
    if sub == "plan":  # every variant x layout of 2 GPUs (not N: 32 GPUs trace 141 candidates) on the shrunk config
        args = [*args[: args.index("--gpus") + 1], "2", *args[args.index("--gpus") + 2 :]] if "--gpus" in args else args
        for flag in ("--tp", "--cp"):  # keep the sizes 2 GPUs have (1 always is)
            if flag in args:
                i = j = args.index(flag) + 1
                while j < len(args) and not args[j].startswith("--"):
                    j += 1
                args = [*args[:i], *([v for v in args[i:j] if v in ("1", "2")] or ["1"]), *args[j:]]
        return _with_set(args, shrink_overrides(ROOT / _option(args, "--config")))
    if sub == "probe":  # of a shrunk run, on fewer patches and bootstrap resamples
        return _with_set(args, PROBE_SIZES)
    if sub in ("eval", "export", "info"):  # eval/export: of a shrunk run; info: on the meta device
        return list(args)
    if sub == "embed":  # of a shrunk run, a few samples (argparse keeps the last --max-samples)
        return [*args, "--max-samples", "4"]
    if sub == "forecast":  # of a shrunk run, from two initialisation times (argparse keeps the last --max-inits)
        return [*args, "--max-inits", "2"]
    raise LookupError(f"`dchag {sub}` has no shrinking rule in this test: add one")


def _dchag_args(argv: tuple[str, ...]) -> list[str] | None:
    """The dchag arguments of `dchag ...`, `python -m dchag ...` or `torchrun ... -m dchag ...`."""
    if argv[0] == "dchag":
        return list(argv[1:])
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "dchag":
            return list(argv[i + 2 :])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm(folder: Path) -> Path:
    """`srun` (runs its command once, on this node), `scontrol show hostnames` and `python` (this venv's)."""
    bin_ = folder / "fake-slurm-bin"
    bin_.mkdir(exist_ok=True)
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": "#!/bin/bash\necho localhost\n",
        "python": f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text(body)
        (bin_ / name).chmod(0o755)
    return bin_


def to_run(command: Command, folder: Path) -> tuple[str, list[str], dict[str, str]]:
    """("main", dchag args, {}) for an in-process run, or ("process", argv, env) for a subprocess."""
    argv, env = list(command.argv), dict(command.env)
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if argv[0] == "sbatch":
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        if script not in SBATCH_LAYOUTS:
            raise LookupError(f"Slurm script {script!r} has no layout in SBATCH_LAYOUTS: add one")
        procs, shrink = SBATCH_LAYOUTS[script]
        args = shrink(argv[argv.index(script) + 1 :])
        slurm = {
            "PATH": f"{_fake_slurm(folder)}:{BIN}:{os.environ['PATH']}",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NNODES": "1",
            "SLURM_GPUS_ON_NODE": str(procs),
            "SLURM_CPUS_PER_TASK": str(procs),  # one thread per process
            "SLURM_JOB_ID": str(os.getpid()),
            "RDZV_PORT": str(_free_port()),
        }
        return "process", ["bash", script, *args], {**base_env, **slurm}
    example = next((a for a in argv if a.startswith("examples/") and a.endswith(".py")), None)
    if argv[0] == "torchrun" and example in EXAMPLE_SCRIPTS:  # already small: run as documented
        return "process", [str(BIN / "torchrun"), *argv[1:]], base_env
    args = _dchag_args(tuple(argv))
    if args is None:
        raise LookupError(f"{argv[0]!r} is a documented program this test cannot run: add a rule")
    args = shrink_dchag(args, folder)
    if argv[0] == "dchag" or (argv[0] == "python" and not env):
        return "main", args, {}
    if argv[0] == "torchrun":
        launcher = argv[: argv.index("-m")]
        return "process", [str(BIN / "torchrun"), *launcher[1:], "-m", "dchag", *args], base_env
    raise LookupError(f"{command.text!r}: no way to run it here")


def run_command(command: Command, folder: Path, capsys) -> tuple[int, str]:
    """Runs one documented command in `folder`; (exit code, the last lines of its error output)."""
    how, argv, env = to_run(command, folder)
    if how == "main":
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # a traceback is a failure of the documented command, not of this test
            return 1, f"{UNCAUGHT}{type(error).__name__}: {error}"
        return code, capsys.readouterr().err.strip()[-2000:]
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    output = done.stderr.strip() or done.stdout.strip()
    ours = sorted({line for line in output.splitlines() if line.startswith("dchag: ")})  # once, not per rank
    return done.returncode, "\n".join(ours) if ours else output[-2000:]


UNCAUGHT = "uncaught "  # run_command's message of an in-process run that raised (exit 1 from a traceback)


def failure(command: Command, code: int, message: str) -> str | None:
    """Why `command`'s run counts as a failure (None: it exited as documented; a traceback never does)."""
    if code == command.exits and not message.startswith(UNCAUGHT):
        return None
    stated = f", documented `# exits {command.exits}`" if command.exits else ""
    return f"{command.document}:{command.line}: `{command.text}` exited {code}{stated}: {message}"


def _workspace(tmp_path: Path) -> Path:
    """tmp_path with copies of what the commands read (copies: a command writing into benchmarks/results
    must not change the repository)."""
    for name in COPIED:
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


# --- the extraction and the rules (fast) -----------------------------------------------------------


def test_the_commands_of_the_readme_and_docs_are_found():
    texts = [c.text for c in documented_commands()]
    assert "dchag info --config configs/era5-84.yaml" in texts
    # a continuation is joined, its comment dropped, its environment kept apart
    restart = next(c for c in documented_commands() if "--max-restarts" in c.argv)
    assert restart.env == (("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1"),) and restart.argv[-1] == "auto"
    assert {c.document for c in documented_commands()} >= {"README.md", "docs/cluster.md", "docs/data.md"}
    assert len(texts) >= 25
    # a command documented to fail, in an indented block, with the exit code its comment states
    faults = [c for c in documented_commands() if "--fault" in c.argv]
    assert faults and all(c.document == "docs/design.md" and c.exits == 1 for c in faults)


def test_a_documented_command_without_a_rule_fails_instead_of_being_skipped(tmp_path):
    """Counter-check: an unknown program, subcommand, sweep or Slurm script is an error, not a skip."""
    doc = "\n".join(
        [
            "```bash",
            "dchag frobnicate --config configs/tiny-weather.yaml",
            "dchag bench --sweep fastest-cpu --json out.json",
            "sbatch examples/slurm/other.sbatch configs/tiny-weather.yaml",
            "deepspeed train.py",
            "make demo   # out of scope",
            "```",
            "```yaml",
            "data: {kind: era5}",
            "```",
        ]
    )
    commands = extract_commands(doc, "test.md")
    assert [c.argv[0] for c in commands] == ["dchag", "dchag", "sbatch", "deepspeed", "make"]
    for command in commands[:4]:
        with pytest.raises(LookupError, match="add|no way|cannot run"):
            to_run(command, tmp_path)


def test_a_failing_documented_command_is_reported_with_its_message(tmp_path, monkeypatch, capsys):
    """Counter-check: the runner sees a non-zero exit (in-process and as a process) and keeps the message."""
    monkeypatch.chdir(_workspace(tmp_path))
    lines = ["dchag info --config no-such.yaml", "torchrun --nproc-per-node 1 -m dchag info --config no-such.yaml"]
    doc = "\n".join(["```bash", *lines, "```"])
    for command in extract_commands(doc, "test.md"):
        code, message = run_command(command, tmp_path, capsys)
        assert code != 0 and message == "dchag: config error: config file 'no-such.yaml' does not exist", message


def test_a_command_documented_to_fail_must_fail_with_the_stated_code(tmp_path, monkeypatch, capsys):
    """`# exits N: why` after a command: exit N passes, exit 0 or another code fails; the indented block
    (inside a list item) is found."""
    monkeypatch.chdir(_workspace(tmp_path))
    lines = [
        "dchag info --config no-such.yaml  # exits 2: no such file",
        "dchag info --config configs/tiny-weather.yaml  # exits 1: but it succeeds",
        "dchag info --config no-such.yaml  # exits 1: the wrong code",
        "dchag info --config no-such.yaml  # the comment states no exit code",
    ]
    doc = "\n".join(["1. An item:", "", "   ```bash", *(f"   {line}" for line in lines), "   ```"])
    commands = extract_commands(doc, "test.md")
    assert [c.exits for c in commands] == [2, 1, 1, 0]
    assert [c.text for c in commands] == [line.split("  #")[0] for line in lines]
    outcomes = [failure(c, *run_command(c, tmp_path, capsys)) for c in commands]
    assert outcomes[0] is None
    assert "exited 0, documented `# exits 1`" in outcomes[1]
    assert "exited 2, documented `# exits 1`: dchag: config error" in outcomes[2]
    assert "exited 2: dchag: config error" in outcomes[3]
    # a crash is not the documented failure, even with the documented code
    monkeypatch.setattr(sys.modules[__name__], "main", lambda argv: 1 / 0)
    assert "exited 1, documented `# exits 1`: uncaught ZeroDivisionError" in failure(
        commands[1], *run_command(commands[1], tmp_path, capsys)
    )


def test_shrinking_adds_to_the_documented_overrides_and_keeps_them():
    args = ["train", "--config", "configs/tiny-weather.yaml", "--set", "parallel.tp=2", "--out", "runs/x"]
    shrunk = shrink_dchag(args, Path("."))
    overrides = shrunk[shrunk.index("--set") + 1 : shrunk.index("--out")]
    assert overrides[0] == "parallel.tp=2"
    assert set(shrink_overrides(ROOT / "configs/tiny-weather.yaml")) <= set(overrides)
    assert shrunk[-2:] == ["--out", "runs/x"]


# --- the documented commands themselves ------------------------------------------------------------


def _in_scope(document: Path) -> list[Command]:
    commands = extract_commands(document.read_text(), str(document.relative_to(ROOT)))
    return [c for c in commands if c.argv[0] not in OUT_OF_SCOPE]


WITH_COMMANDS = [d for d in DOCUMENTS if _in_scope(d)]


@pytest.mark.parametrize("document", WITH_COMMANDS, ids=[d.name for d in WITH_COMMANDS])
def test_every_documented_command_runs(document, tmp_path, monkeypatch, capsys):
    """The document's commands in order, in one folder; every failing one is listed with its message."""
    folder = _workspace(tmp_path)
    monkeypatch.chdir(folder)
    failures, times = [], []
    for command in _in_scope(document):
        start = time.perf_counter()
        code, message = run_command(command, folder, capsys)
        times.append(f"{time.perf_counter() - start:6.1f} s  {command.text}")
        if (why := failure(command, code, message)) is not None:
            failures.append(why)
    print("\n".join(times))
    assert not failures, "documented commands that fail:\n" + "\n\n".join(failures)
