"""`main.py --mode export`: a checkpoint -> model.safetensors + config.json (resolved config, provenance)."""

from __future__ import annotations

from production.config.fields import with_defaults
from production.core.layout import checkpoint_file
from production.train.checkpoint import load_model, save_export


def run(values: dict, argv: list[str]) -> int:
    v = with_defaults(values)
    source = checkpoint_file(v["ckpt"])
    model, ckpt = load_model(source)
    save_export(model, ckpt, source, v["out"])
    size = sum(p.stat().st_size for p in v["out"].iterdir())
    print(
        f"wrote {v['out']}/model.safetensors and config.json ({size / 2**20:.1f} MiB; step {ckpt['step']} of "
        f"{source}); --ckpt {v['out']} samples from it"
    )
    return 0
