"""The ``morec-rec`` command.

Expected failures (bad input, bad configuration) print one line naming the file, field or
value, and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from morec_rec.config import PrepareConfig, SourceConfig, add_arguments, build, load_file
from morec_rec.data.format import MANIFEST, PreparedDataset
from morec_rec.errors import MorecError

DEMO_PROFILE = "demo"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except MorecError as e:
        print(f"morec-rec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("morec-rec: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morec-rec", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="prepare a raw source into the data format")
    prepare.add_argument("--source", required=True, help="generic, amazon, tafeng or morec")
    prepare.add_argument("--input", required=True, type=Path, help="interactions file")
    prepare.add_argument("--meta", type=Path, help="item metadata file (where the source has one)")
    _add_common(prepare)
    add_arguments(prepare, SourceConfig)
    prepare.set_defaults(run=_prepare)

    synth = commands.add_parser("synth", help="generate a synthetic dataset, prepared")
    synth.add_argument("--profile", required=True, help="tiny, demo or xbox")
    _add_common(synth)
    synth.set_defaults(run=_synth)

    demo = commands.add_parser("demo", help="the main job on the embedded default data")
    demo.add_argument("--out", required=True, type=Path, help="output directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output dataset directory")
    parser.add_argument("--config", type=Path, help="TOML file with [prepare] / [source] tables")
    add_arguments(parser, PrepareConfig)


def _prepare(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_output, prepare
    from morec_rec.data.sources import read_source

    file = load_file(args.config, ("prepare", "source"))
    config = build(PrepareConfig, file["prepare"], args)
    source = build(SourceConfig, file["source"], args)
    check_output(args.out)  # before the (possibly long) read
    raw = read_source(args.source, args.input, args.meta, source)
    print(summary(args.out, prepare(raw, args.out, config)))


def _synth(args: argparse.Namespace) -> None:
    config = build(PrepareConfig, load_file(args.config, ("prepare",))["prepare"], args)
    print(summary(args.out, synthesize(args.profile, args.out, config)))


def _demo(args: argparse.Namespace) -> None:
    data = args.out / "data"
    config = PrepareConfig(seed=args.seed)
    if (data / MANIFEST).is_file():  # a rerun reuses the data it prepared before
        manifest = PreparedDataset.open(data).manifest
        if manifest["source"].get("profile") != DEMO_PROFILE or manifest["parameters"] != (
            dataclasses.asdict(config)
        ):
            raise MorecError(f"{data}: holds other data than the demo's (seed {args.seed}); "
                             "choose another --out")
    else:
        manifest = synthesize(DEMO_PROFILE, data, config)
    print(summary(data, manifest))


def synthesize(profile: str, out: Path, config: PrepareConfig) -> dict[str, Any]:
    """Generates the synthetic ``profile`` with seed ``config.seed`` and prepares it."""
    from morec_rec.data.prepare import prepare
    from morec_rec.data.synth import PROFILES, generate

    if profile not in PROFILES:
        raise MorecError(f"unknown profile {profile!r} (expected one of {', '.join(PROFILES)})")
    return prepare(generate(PROFILES[profile], config.seed), out, config)


def summary(out: Path, manifest: dict[str, Any]) -> str:
    """A few lines describing a prepared dataset."""
    n = manifest["num_interactions"]
    groups = manifest["groups"]
    return (
        f"prepared {out}: {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
        f"{sum(n.values()):,} interactions (train {n['train']:,}, valid {n['valid']:,}, "
        f"test {n['test']:,})\n"
        f"  {len(groups['fairness']['names'])} fairness groups, "
        f"{len(groups['popularity']['num_items'])} popularity groups, "
        f"{len(manifest['shards'])} train shard(s), "
        f"mean item price {manifest['price']['item_mean']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
