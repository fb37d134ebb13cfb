"""Build (and exec) the `accelerate launch` command for this SLURM node.

Run once per node (``srun --ntasks-per-node=1``), e.g. from
launch/slurm/pretrain.sbatch:

    python -m trainer.entry.node_command [--config_file CFG] [--gpus-per-node G]
        [--port P] [--dry-run] -- -m trainer.entry.<stage> <stage args...>

(or python launch/slurm/node_command.py …). Whatever follows ``--`` is what
`accelerate launch` runs: ``-m <module> args`` or ``<script.py> args``.

Everything comes from SLURM's environment:

* SLURM_JOB_NODELIST  compressed hostlist (``gpu[01-02,05]``); the first host
                      is the main process (rank 0) host.
* SLURM_NNODES        number of machines.
* SLURM_NODEID        machine rank of this node (not needed for --dry-run).
* GPUs per node       SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE (``4`` or
                      ``h100:4``), else --gpus-per-node.
* Port                --port, else MAIN_PROCESS_PORT, else 29500.

--dry-run prints the command of every node in the allocation and exits 0.
Bad or missing SLURM variables: one ``error: ...`` line on stderr, exit 2.
Standard library only (and trainer/logs.py, which is): this runs before any
training dependency is imported.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys

from trainer import logs

DEFAULT_CONFIG = "launch/accelerate/multi_node.yaml"
DEFAULT_PORT = 29500

log = logging.getLogger(__name__)


class SlurmError(ValueError):
    """A missing or malformed SLURM setting (reported as `error: ...`)."""


# --------------------------------------------------------------------------- #
# Hostlist expansion
# --------------------------------------------------------------------------- #
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, pattern: str) -> list[str]:
    """'01-02,05' -> ['01', '02', '05'] (zero padding kept from the start)."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise SlurmError(f"bad range {item!r} in hostlist {pattern!r}")
        lo_text, hi_text = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise SlurmError(f"descending range {item!r} in hostlist {pattern!r}")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_pattern(pattern: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: r[1-2]n[1-2]."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    prefix, rest = pattern[: m.start()], pattern[m.end():]
    tails = _expand_pattern(rest)
    return [prefix + v + t for v in _expand_range_set(m.group(1), pattern) for t in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist, e.g. 'node-a1,node-b[3-4]' -> [node-a1, node-b3, node-b4]."""
    hosts = []
    for part in _split_top_level(hostlist.strip()):
        part = part.strip()
        if not part:
            raise SlurmError(f"empty entry in hostlist {hostlist!r}")
        hosts.extend(_expand_pattern(part))
    return hosts


# --------------------------------------------------------------------------- #
# Reading SLURM's environment
# --------------------------------------------------------------------------- #
def _positive_int(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise SlurmError(f"{what} must be an integer, got {value!r}") from None
    if n < 1:
        raise SlurmError(f"{what} must be >= 1, got {value!r}")
    return n


def _require(env: dict, name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SlurmError(f"{name} is not set (run this inside a SLURM allocation)")
    return value


def gpus_per_node(env: dict, fallback: int | None) -> int:
    """SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ('4', 'h100:4', 'gpu:h100:4'), else fallback."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return _positive_int(env["SLURM_GPUS_ON_NODE"].strip(), "SLURM_GPUS_ON_NODE")
    spec = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if spec:
        # Several types may be listed ('a100:2,v100:2'); the count is the last ':' field.
        counts = [entry.rsplit(":", 1)[-1].strip() for entry in spec.split(",")]
        return sum(_positive_int(c, f"SLURM_GPUS_PER_NODE ({spec!r})") for c in counts)
    if fallback is not None:
        if fallback < 1:
            raise SlurmError(f"--gpus-per-node must be >= 1, got {fallback}")
        return fallback
    raise SlurmError("GPUs per node unknown: set SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE "
                     "(sbatch --gpus-per-node) or pass --gpus-per-node")


def read_allocation(env: dict, gpus_fallback: int | None, need_rank: bool) -> dict:
    hosts = expand_hostlist(_require(env, "SLURM_JOB_NODELIST"))
    nnodes = _positive_int(_require(env, "SLURM_NNODES"), "SLURM_NNODES")
    if nnodes != len(hosts):
        raise SlurmError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST has {len(hosts)} hosts")
    rank = None
    if need_rank or env.get("SLURM_NODEID", "").strip():
        raw = _require(env, "SLURM_NODEID")
        if not raw.isdigit() or int(raw) >= nnodes:
            raise SlurmError(f"SLURM_NODEID must be in 0..{nnodes - 1}, got {raw!r}")
        rank = int(raw)
    return {"hosts": hosts, "nnodes": nnodes, "rank": rank,
            "gpus": gpus_per_node(env, gpus_fallback)}


def resolve_port(cli_port: int | None, env: dict) -> int:
    if cli_port is not None:
        port = cli_port
    elif env.get("MAIN_PROCESS_PORT", "").strip():
        port = _positive_int(env["MAIN_PROCESS_PORT"].strip(), "MAIN_PROCESS_PORT")
    else:
        port = DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise SlurmError(f"port must be in 1..65535, got {port}")
    return port


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def build_command(config_file: str, alloc: dict, rank: int, port: int, script: list[str]) -> list[str]:
    return [
        "accelerate", "launch",
        "--config_file", config_file,
        "--num_machines", str(alloc["nnodes"]),
        "--num_processes", str(alloc["nnodes"] * alloc["gpus"]),
        "--machine_rank", str(rank),
        "--main_process_ip", alloc["hosts"][0],
        "--main_process_port", str(port),
        "--rdzv_backend", "static",
        "--same_network",
        *script,
    ]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Build the `accelerate launch` command for this SLURM node.",
        prog="python -m trainer.entry.node_command",
        usage="%(prog)s [options] -- (-m <module> | <script>) [args...]")
    parser.add_argument("--config_file", default=DEFAULT_CONFIG,
                        help=f"accelerate config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="used only if SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE are unset")
    parser.add_argument("--port", type=int, default=None,
                        help=f"main process port (default: $MAIN_PROCESS_PORT or {DEFAULT_PORT})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command of every node and exit")
    if "--" not in argv:
        parser.error("missing '-- <script> [script args...]'")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    script = argv[split + 1:]
    if not script:
        parser.error("no script given after '--'")
    return args, script


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    args, script = parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup()
    env = dict(os.environ if env is None else env)
    try:
        alloc = read_allocation(env, args.gpus_per_node, need_rank=not args.dry_run)
        port = resolve_port(args.port, env)
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.dry_run:  # the command's result (the lines themselves), not a job log: plain prints
        for rank, host in enumerate(alloc["hosts"]):
            cmd = build_command(args.config_file, alloc, rank, port, script)
            print(f"node {rank} ({host}): {shlex.join(cmd)}")
        return 0

    cmd = build_command(args.config_file, alloc, alloc["rank"], port, script)
    log.info(f"node {alloc['rank']} ({alloc['hosts'][alloc['rank']]}): {shlex.join(cmd)}")
    # The sbatch script forwards SIGUSR1 to every process of the step. The
    # trainer installs its own handler (checkpoint, exit 0), but the launcher
    # (accelerate / torchrun agent) has none and would die on it, and its
    # workers with it. An ignored disposition survives exec, so the launcher
    # ignores USR1 and simply waits for the workers to finish.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"error: cannot exec {cmd[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
