"""The paper manifest: loading, validation against the config code, and per-run plans.

A manifest is `{version: 2, defaults: {overrides}, groups: [...]}`; a group is `{name, description, paper,
table, data, overrides?, runs}` and a run `{id, exp, size, seed, steps, overrides?, expected}`. `paper` marks
the groups the paper reports by default, `table` the generated table (main or scale) that shows them.
Overrides use config field names (n_layer, block_size, eval_every, ...: production.config.fields.OVERRIDE_FIELDS);
`expected` names resolved-config fields (model or train fields, size, exp) and the values they must have. Every
selected run is resolved by the same `resolve()` that main.py calls, and checked, before anything trains.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from production.config.fields import OVERRIDE_FIELDS, to_argv
from production.config.resolve import resolve
from production.core.errors import UserError
from production.core.layout import REPO_ROOT

MANIFEST_VERSION = 2
RUN_KEYS = {"id", "exp", "size", "seed", "steps", "overrides", "expected"}
RUN_REQUIRED = ("id", "exp", "size", "seed", "steps", "expected")
GROUP_KEYS = {"name", "description", "paper", "table", "data", "overrides", "runs"}


@dataclass
class RunPlan:
    group: str
    spec: dict  # the manifest entry
    data: str | None  # token file, None = the embedded corpus
    values: dict  # main.py options by field name (without --resume)
    resolved: dict  # resolved config without the data section
    launcher: tuple[str, ...] = ()  # torchrun and its flags, or () for a plain process

    @property
    def id(self) -> str:
        return self.spec["id"]

    @property
    def argv(self) -> list[str]:
        return to_argv(self.values)

    def command(self, extra: list[str] = ()) -> list[str]:
        return [sys.executable, *self.launcher, str(REPO_ROOT / "main.py"), *self.argv, *extra]

    def command_text(self, extra: list[str] = ()) -> str:
        return shlex.join(self.command(extra))


def load_manifest(path: Path) -> tuple[dict, str]:
    """Parsed manifest and its sha256; structural problems are UserErrors naming the place."""
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"manifest {path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise UserError(f"manifest {path} must be an object with version {MANIFEST_VERSION}")
    groups = manifest.get("groups")
    if not isinstance(groups, list) or not groups:
        raise UserError(f"manifest {path} has no groups")
    seen = set()
    for g in groups:
        if not isinstance(g, dict) or "name" not in g or not isinstance(g.get("runs"), list):
            raise UserError(f"manifest {path}: every group needs a name and a runs list")
        extra = set(g) - GROUP_KEYS
        if extra:
            raise UserError(f"manifest group {g['name']}: unknown keys {sorted(extra)}")
        for r in g["runs"]:
            missing = [k for k in RUN_REQUIRED if k not in r]
            if missing:
                raise UserError(f"manifest run {r.get('id', '?')} (group {g['name']}) lacks {', '.join(missing)}")
            if set(r) - RUN_KEYS:
                raise UserError(f"manifest run {r['id']}: unknown keys {sorted(set(r) - RUN_KEYS)}")
            if r["id"] in seen:
                raise UserError(f"manifest run id {r['id']} appears twice")
            seen.add(r["id"])
    return manifest, hashlib.sha256(raw).hexdigest()


def select_runs(manifest: dict, group: str, only: list[str] | None) -> tuple[dict, list[dict]]:
    names = [g["name"] for g in manifest["groups"]]
    if group not in names:
        raise UserError(f"no group {group!r} in the manifest; groups: {', '.join(names)}")
    g = manifest["groups"][names.index(group)]
    runs = g["runs"]
    if only:
        ids = [r["id"] for r in runs]
        unknown = [i for i in only if i not in ids]
        if unknown:
            raise UserError(f"run(s) {', '.join(unknown)} not in group {group}; its runs: {', '.join(ids)}")
        runs = [r for r in runs if r["id"] in only]
    return g, runs


def resolved_value(resolved: dict, field: str):
    """Look a field up in the resolved config: top level (size, exp), then model, then train."""
    for section in (resolved, resolved["model"], resolved["train"]):
        if field in section and not isinstance(section[field], dict):
            return section[field]
    raise KeyError(field)


def torchrun_launcher(
    nproc: int | None, nnodes: int | None, node_rank: int | None, master_addr: str | None, master_port: int | None
) -> tuple[str, ...]:
    """`-m torch.distributed.run --nproc_per_node N [multi-node flags]`, or () without --nproc-per-node."""
    if nproc is None:
        if any(v is not None for v in (nnodes, node_rank, master_addr, master_port)):
            raise UserError("--nnodes/--node-rank/--master-addr/--master-port need --nproc-per-node")
        return ()
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {nproc}")
    flags = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    for name, value in (
        ("nnodes", nnodes),
        ("node_rank", node_rank),
        ("master_addr", master_addr),
        ("master_port", master_port),
    ):
        if value is not None:
            flags += [f"--{name}", str(value)]
    return tuple(flags)


def plan_run(
    manifest: dict, group: dict, r: dict, runs_dir: Path, device: str, launcher: tuple[str, ...], dist: str | None
) -> RunPlan:
    """One run resolved by the same `resolve()` main.py calls; raises UserError when it does not resolve."""
    overrides = {
        **manifest.get("defaults", {}).get("overrides", {}),
        **group.get("overrides", {}),
        **r.get("overrides", {}),
    }
    unknown = [k for k in overrides if k not in OVERRIDE_FIELDS]
    if unknown:
        raise UserError(f"unknown override {unknown[0]!r}; valid: {', '.join(OVERRIDE_FIELDS)}")
    run = {"seed": r["seed"], "steps": r["steps"]}
    resolved = resolve(r["size"], r["exp"], {**overrides, **run, "device": device})
    world = manifest_world_size(launcher)
    if (resolved.train.batch_size * resolved.train.grad_accum) % world:
        raise UserError(
            f"its global batch of {resolved.train.batch_size} x {resolved.train.grad_accum} windows "
            f"does not divide over {world} ranks per node"
        )
    values = {
        "mode": "train",
        "size": r["size"],
        "exp": r["exp"],
        **run,
        "out_dir": runs_dir / r["id"],
        "device": device,
        **overrides,
    }
    if group.get("data"):
        values["data"] = group["data"]
    if launcher and dist:
        values["dist"] = dist
    return RunPlan(group["name"], r, group.get("data"), values, resolved.to_dict(), launcher)


def expectation_problems(expected, resolved: dict) -> list[str]:
    """Each `expected` field the resolved config does not have, or has with another value."""
    if not isinstance(expected, dict) or not expected:
        return ["`expected` must be a non-empty object of resolved-config fields"]
    problems = []
    for field, want in expected.items():
        try:
            got = resolved_value(resolved, field)
        except KeyError:
            problems.append(f"expected field {field!r} is not a resolved-config field")
            continue
        if got != want:
            problems.append(f"expected {field} = {want!r}, but it resolves to {got!r}")
    return problems


def plan_runs(
    manifest: dict,
    group: dict,
    runs: list[dict],
    runs_dir: Path,
    device: str,
    launcher: tuple[str, ...] = (),
    dist: str | None = None,
) -> list[RunPlan]:
    """Resolve and check every run; all problems are reported together, before anything trains."""
    plans, problems = [], []
    for r in runs:
        try:
            plan = plan_run(manifest, group, r, runs_dir, device, launcher, dist)
        except UserError as e:
            problems.append(f"run {r['id']}: {e}")
            continue
        found = expectation_problems(r["expected"], plan.resolved)
        problems += [f"run {r['id']}: {p}" for p in found]
        if not found:
            plans.append(plan)
    if problems:
        raise UserError(f"{len(problems)} manifest problem(s): " + "; ".join(problems))
    return plans


def same_training(plans: list[RunPlan]) -> dict[str, str]:
    """Run id -> the id of an earlier plan that trains exactly the same thing (model, recipe with seed and steps,
    data). The manifest keeps both ids, as the paper lists both; the runner trains the first one only."""
    first, same = {}, {}
    for plan in plans:
        key = json.dumps([plan.resolved["model"], plan.resolved["train"], plan.data], sort_keys=True)
        if key in first:
            same[plan.id] = first[key]
        else:
            first[key] = plan.id
    return same


def manifest_world_size(launcher: tuple[str, ...]) -> int:
    """Processes per node of a torchrun launcher (the check that needs the node count happens in main.py)."""
    return int(launcher[launcher.index("--nproc_per_node") + 1]) if launcher else 1
