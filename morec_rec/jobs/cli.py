"""The ``morec-rec`` command.

Expected failures (bad input, bad configuration) print one line naming the file, field or
value, and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NoReturn, Sequence

from morec_rec.config import (
    MoRecConfig,
    PrepareConfig,
    SamplerConfig,
    SourceConfig,
    TrainConfig,
    add_arguments,
    build,
    load_file,
)
from morec_rec.data.format import MANIFEST, PreparedDataset
from morec_rec.errors import MorecError
from morec_rec.jobs.bootstrap import PairedBootstrap
from morec_rec.plugin.eval.metrics import METRICS, VALIDITY_THRESHOLD

if TYPE_CHECKING:
    from morec_rec.jobs.run import Run

DEMO_PROFILE = "demo"
#: The demo's settings beside the defaults: small enough for a few minutes on 2 CPU cores.
#: Its epochs are short, 12 batches between two of MoRec's 16 rounds an epoch, so a
#: worker request brings one batch: every mass update then applies before the next round
#: (``MoRec.loader.lookahead``).
DEMO_SETTINGS = {"train": {"max_epochs": 20, "patience": 2, "batches_per_request": 1}}
#: The settings a resume may change: how long training goes on and how it saves and
#: evaluates, never what a step computes. A flag for any other setting is refused.
RESUMABLE = ("checkpoint_every", "epochs", "eval_chunk_users", "max_epochs", "patience")
#: A job's configs, in its record's order.
JOB_CONFIGS = (TrainConfig, SamplerConfig, MoRecConfig)
#: A job's settings that every stage takes from ``[train]``: one seed, and one sample of
#: validation users for pretraining and MoRec alike. No flag sets them in their own table,
#: and a config file that does is refused.
FROM_TRAIN = {"sampler": ("seed",), "morec": ("validation_users",)}


#: Third-party deprecation notices that say nothing about the user's job (the command line
#: silences them; the library leaves warnings alone).
_QUIET_WARNINGS = (
    r"`broadcast_buffers` is deprecated",  # torchrec's DMP constructing DDP
    r"[\s\S]*fbgemm_gpu.split_table_batched_embeddings_ops is now DEPRECATED",
)


#: What the machine, not the input or the code, refuses a command that writes its outputs.
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                       errno.EPERM, errno.EIO}


def main(argv: Sequence[str] | None = None) -> int:
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    try:
        args.command(args)
    except MorecError as e:
        print(f"morec-rec: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRORS:
            raise
        print(f"morec-rec: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("morec-rec: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("morec-rec: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if "torch.distributed" in sys.modules:  # only commands that train or evaluate
            from morec_rec.jobs import distributed

            distributed.shutdown()
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (the usage is one ``--help`` away);
    a flag is spelled out (``--epoch`` is no ``--epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """As argparse's, but a command's unknown flag is that command's error (its
        ``--help`` lists its flags), not the top-level parser's."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            commands = next(action for action in self._actions
                            if isinstance(action, argparse._SubParsersAction))
            parser = commands.choices.get(getattr(parsed, "command_name", None), self)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="morec-rec", description="MoRec's jobs: prepare data, pretrain a "
                     "backbone, continue it with MoRec or a baseline, evaluate and compare.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command_name")

    prepare = commands.add_parser("prepare", help="prepare a raw source into the data format")
    prepare.add_argument("--source", required=True, help="generic, amazon, tafeng or morec")
    prepare.add_argument("--input", required=True, type=Path, help="interactions file")
    prepare.add_argument("--meta", type=Path, help="item metadata file (where the source has one)")
    _add_common(prepare, "[prepare] and [source] tables")
    add_arguments(prepare, SourceConfig)
    prepare.set_defaults(command=_prepare)

    synth = commands.add_parser("synth", help="generate a synthetic dataset, prepared")
    synth.add_argument("--profile", required=True, help="tiny, demo, skewed or xbox")
    _add_common(synth, "a [prepare] table")
    synth.set_defaults(command=_synth)

    train = commands.add_parser("train", help="train a backbone (also under torchrun)")
    train.add_argument("--data", type=Path, help="prepared dataset (not with --resume)")
    train.add_argument("--out", required=True, type=Path, help="run directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out with its settings (flags may change "
                            f"only {_resumable(TrainConfig)})")
    train.add_argument("--config", type=Path, help="TOML file with a [train] table")
    add_arguments(train, TrainConfig)
    train.set_defaults(command=_train)

    evaluate = commands.add_parser("evaluate", help="full-ranking metrics of a run or baseline")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a run directory (its best checkpoint)")
    source.add_argument("--data", type=Path, help="a prepared dataset, with --model popular")
    evaluate.add_argument("--model", choices=["popular"], help="baseline to evaluate on --data")
    evaluate.add_argument("--split", choices=["valid", "test"], default="test",
                          help="the held-out split whose users are ranked (default: test)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--against", type=Path,
                          help="a second run: compare --run with it on the same users, by a "
                               "paired bootstrap over the users (one process)")
    # None where not given: they are refused without --against, which defaults them.
    evaluate.add_argument("--resamples", type=_positive,
                          help="paired resamples for --against (default: 1000)")
    evaluate.add_argument("--seed", type=int, help="resampling seed for --against (default: 0)")
    evaluate.add_argument("--imp-over", type=_imp_terms, metavar="TERMS",
                          help="the metrics Imp averages for --against, comma-separated "
                               f"(default: {','.join(METRICS)})")
    evaluate.set_defaults(command=_evaluate)

    run = commands.add_parser("run", help="pretrain, continue with MoRec, evaluate on test")
    run.add_argument("--data", type=Path, help="prepared dataset (not with --resume)")
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument("--base", type=Path,
                     help="an existing base run (default: pretrain one); its model, "
                          "embedding size, table optimizer and dropout are the job's defaults")
    run.add_argument("--continued", action="store_true",
                     help="also run accuracy-only continued training from the same base")
    run.add_argument("--resume", action="store_true",
                     help="continue the job in --out with its settings (flags may change "
                          f"only {_resumable(*JOB_CONFIGS)})")
    _add_job_arguments(run)
    run.set_defaults(command=_run)

    demo = commands.add_parser("demo", help="the main job on the embedded default data")
    demo.add_argument("--out", required=True, type=Path, help="output directory")
    _add_job_arguments(demo, DEMO_SETTINGS)
    demo.set_defaults(command=_demo)
    return parser


def _positive(text: str) -> int:
    """``--resamples``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 1")
    return value


def _imp_terms(text: str) -> tuple[str, ...]:
    """``--imp-over``: comma-separated names of ``METRICS``."""
    terms = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in terms if name not in METRICS]
    if unknown or len(set(terms)) != len(terms):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected distinct names among {', '.join(METRICS)}")
    return terms


def _add_job_arguments(parser: argparse.ArgumentParser,
                       defaults: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """The job's flags, their help showing ``defaults`` (by table) where given."""
    defaults = defaults or {}
    parser.add_argument("--config", type=Path,
                        help="TOML file with [train], [sampler] and [morec] tables")
    add_arguments(parser, TrainConfig, defaults=defaults.get("train"))
    add_arguments(parser, SamplerConfig, exclude=FROM_TRAIN["sampler"],
                  defaults=defaults.get("sampler"))
    add_arguments(parser, MoRecConfig, exclude=FROM_TRAIN["morec"],
                  defaults=defaults.get("morec"))


def _job_configs(args: argparse.Namespace,
                 defaults: dict[str, dict[str, Any]] | None = None,
                 ) -> tuple[TrainConfig, SamplerConfig, MoRecConfig]:
    """The job's configs: ``defaults`` < the config file < flags."""
    file = load_file(args.config, ("train", "sampler", "morec"))
    for table, names in FROM_TRAIN.items():
        for name in set(names) & set(file[table]):
            raise MorecError(f"{args.config}: [{table}] {name}: a job takes it from [train] "
                             f"for every stage; set it there")
    return _build_job({k: {**(defaults or {}).get(k, {}), **v} for k, v in file.items()}, args,
                      args.config, "[{}]")


def _build_job(tables: dict[str, dict[str, Any]], args: argparse.Namespace,
               file: Path | None, where: str = "{}",
               ) -> tuple[TrainConfig, SamplerConfig, MoRecConfig]:
    """The job's configs from its ``train``, ``sampler`` and ``morec`` tables, read from
    ``file`` (``where`` formats a table's name in its errors), and the flags; the
    :data:`FROM_TRAIN` settings taken from the train config."""
    train = build(TrainConfig, tables["train"], args, _where(file, where.format("train")))
    shared = {table: {name: getattr(train, name) for name in names}
              for table, names in FROM_TRAIN.items()}
    return (train, build(SamplerConfig, {**tables["sampler"], **shared["sampler"]}, args,
                         _where(file, where.format("sampler"))),
            build(MoRecConfig, {**tables["morec"], **shared["morec"]}, args,
                  _where(file, where.format("morec"))))


def _where(file: Path | None, table: str) -> str | None:
    """Where config values were read, for :func:`~morec_rec.config.build`: ``table`` of
    ``file``, or None for no file."""
    return None if file is None else f"{file}: {table}"


def _add_common(parser: argparse.ArgumentParser, tables: str) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output dataset directory")
    parser.add_argument("--config", type=Path, help=f"TOML file with {tables}")
    add_arguments(parser, PrepareConfig)


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is."""


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM (``timeout``, a scheduler, ``docker stop``) raises :class:`_Terminated`, so
    that an output being written is removed as on Ctrl-C: by default it ends the process
    where it stands. For the commands of one process; a torchrun job's ranks keep the
    default, which their launcher relies on."""

    def terminate(signum: int, frame: Any) -> NoReturn:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_output, prepare
    from morec_rec.data.sources import read_source

    file = load_file(args.config, ("prepare", "source"))
    config = build(PrepareConfig, file["prepare"], args, _where(args.config, "[prepare]"))
    source = build(SourceConfig, file["source"], args, _where(args.config, "[source]"))
    check_output(args.out)  # before the (possibly long) read
    with _cleanup_on_sigterm():
        raw = read_source(args.source, args.input, args.meta, source)
        manifest = prepare(raw, args.out, config)
    print(summary(args.out, manifest))


def _synth(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_output

    config = build(PrepareConfig, load_file(args.config, ("prepare",))["prepare"], args,
                   _where(args.config, "[prepare]"))
    check_output(args.out)  # before the (possibly long) generation
    with _cleanup_on_sigterm():
        manifest = synthesize(args.profile, args.out, config)
    print(summary(args.out, manifest))


def _train(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_writable
    from morec_rec.jobs import distributed
    from morec_rec.jobs.run import RECORD, Run, data_fields, hold, recorded_data
    from morec_rec.jobs.train import train

    resume = args.resume or _is_restart(args.out / RECORD, args.data)
    if resume:
        if args.resume and (args.data is not None or args.config is not None):
            raise MorecError("--resume continues the run's own data and settings: drop --data "
                             "and --config")
        run = Run.open(args.out)
        record = run.record
        if "morec" in record:
            raise MorecError(f"{args.out}: a job's continued training, not a pretraining: "
                             f"resume its job with morec-rec run --out {args.out.parent} "
                             "--resume")
        config = build(TrainConfig, record["config"], args, f"{args.out / RECORD}: config")
        _keep_settings(args.out / RECORD, record["config"], config, _resumable(TrainConfig))
        _keep_epochs(args.out, config.max_epochs, "--max-epochs")
        dataset = recorded_data(record, args.out / RECORD)
        env = distributed.init()
        _check_training(dataset, config, env.world_size)
    else:
        if args.data is None:
            raise MorecError("train needs --data (or --resume)")
        config = build(TrainConfig, load_file(args.config, ("train",))["train"], args,
                       _where(args.config, "[train]"))
        dataset = PreparedDataset.open(args.data)
        env = distributed.init()
        _check_training(dataset, config, env.world_size)
        check_writable(args.out)
        run = Run.create(args.out, {"config": dataclasses.asdict(config),
                                    **data_fields(dataset), "world_size": env.world_size})
    with hold(args.out):
        if resume:
            run.resume(env.world_size, {"config": dataclasses.asdict(config)})
        progress = train(dataset, config, run, resume=resume)
    if distributed.init().is_main:
        print(f"trained {config.model}: {progress.epoch} epoch(s), {progress.step} steps; best "
              f"validation hit@10 {progress.best_hit:.4f} at step {progress.best_step}; "
              f"run in {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    import torch

    from morec_rec.jobs import distributed
    from morec_rec.jobs.job import run_scorer
    from morec_rec.plugin.eval.ranking import PopularityScorer, evaluate, load_task

    if args.against is not None:
        _compare(args)
        return
    given = [flag for flag, value in (("--resamples", args.resamples), ("--seed", args.seed),
                                      ("--imp-over", args.imp_over)) if value is not None]
    if given:
        raise MorecError(f"{', '.join(given)}: for a comparison of two runs (--against)")
    env = distributed.init()
    if args.run is not None:
        if args.model is not None:
            raise MorecError("--model names a baseline for --data; a run knows its model")
        scorer, dataset, config = run_scorer(_evaluable(args.run, env.is_main), env)
        name = config.model
    else:
        if args.model != "popular":
            raise MorecError("--data needs --model popular (or evaluate a run with --run)")
        dataset = PreparedDataset.open(args.data)
        scorer = PopularityScorer(dataset.item_columns(["train_count"])["train_count"])
        name = "popular"
    with torch.no_grad():
        metrics = evaluate(scorer, load_task(dataset, args.split, rank=env.rank,
                                             world_size=env.world_size))
    if env.is_main:
        print(format_metrics(name, args.split, metrics.users, metrics.as_dict(), args.json))


def _compare(args: argparse.Namespace) -> None:
    import torch

    from morec_rec.jobs import distributed
    from morec_rec.jobs.bootstrap import paired_bootstrap
    from morec_rec.jobs.job import run_scorer
    from morec_rec.plugin.eval.ranking import K, evaluate_users, load_task

    if args.run is None:
        raise MorecError("--against compares two runs: name the first with --run")
    env = distributed.init()
    runs = [_evaluable(args.run, env.is_main), _evaluable(args.against, env.is_main)]
    data = [Path(run.record["data"]).resolve() for run in runs]
    if data[0] != data[1]:
        raise MorecError(f"{args.run} and {args.against} were trained on different data "
                         f"({data[0]} and {data[1]}): nothing to pair")
    scorers = [run_scorer(run, env) for run in runs]
    task = load_task(scorers[0][1], args.split)  # the same data: one task serves both
    with torch.no_grad():
        rows = [evaluate_users(scorer, task, chunk_users=config.eval_chunk_users)
                for scorer, _, config in scorers]
    result = paired_bootstrap(*rows, task.q, k=K, num_fairness_groups=task.num_fairness_groups,
                              resamples=args.resamples or 1000, seed=args.seed or 0,
                              imp_terms=args.imp_over or METRICS)
    print(format_comparison(str(args.run), str(args.against), args.split, len(task), result,
                            args.json))


def _evaluable(root: Path, is_main: bool) -> Run:
    """The run at ``root`` if it has a best checkpoint to evaluate (else MorecError); prints
    a warning (on rank 0) if its training did not finish."""
    from morec_rec.jobs import checkpoint
    from morec_rec.jobs.job import JOB
    from morec_rec.jobs.run import Run

    if (root / JOB).is_file():
        stages = ", ".join(str(root / stage) for stage in ("base", "morec", "continued")
                           if (root / stage).is_dir())
        raise MorecError(f"{root}: a job, not a run: evaluate one of its runs ({stages})")
    run = Run.open(root)
    if checkpoint.resolve(run.best) is None:
        raise MorecError(f"{root}: nothing to evaluate: no best checkpoint (the run stopped "
                         "before its first validation)")
    unfinished = _unfinished(run)
    if is_main and unfinished:
        print(f"morec-rec: warning: {root}: unfinished run ({unfinished}): evaluating its "
              "best checkpoint so far", file=sys.stderr)
    return run


def _unfinished(run: Run) -> str | None:
    """How far ``run``'s training got ("1 of 3 epochs") if it did not finish, else None."""
    from morec_rec.jobs import checkpoint
    from morec_rec.jobs.run import RECORD

    record = run.record
    config = build(TrainConfig, record["config"], None, f"{run.root / RECORD}: config")
    done = (checkpoint.read_meta(run.last, ("progress",))["progress"]
            if checkpoint.resolve(run.last) is not None else {})
    epoch = done.get("epoch", 0)
    if "morec" in record:  # continued training: a fixed number of epochs
        total = build(MoRecConfig, record["morec"], None, f"{run.root / RECORD}: morec").epochs
        stopped = False
    else:  # a backbone: until early stop or max_epochs
        total, stopped = config.max_epochs, done.get("stale", 0) >= config.patience
    return f"{epoch} of {total} epochs" if epoch < total and not stopped else None


def format_comparison(a: str, b: str, split: str, users: int, result: PairedBootstrap,
                      as_json: bool) -> str:
    """The paired comparison of run ``a`` with run ``b``: a table, or one JSON object."""
    if as_json:
        return json.dumps({"run": a, "against": b, "split": split, "users": users,
                           **dataclasses.asdict(result)})
    percent = round(100 * result.level)
    lines = [f"{a} against {b} on {split} ({users:,} users; {result.resamples:,} paired "
             f"resamples of the users, {percent}% intervals)",
             f"  {'metric':<12}{'A':>10}{'B':>10}{'A - B':>10}   {'interval':<20}  A ahead in"]
    for key, difference in result.difference.items():
        low, high = result.interval[key]
        lines.append(f"  {key:<12}{result.a[key]:>10.4f}{result.b[key]:>10.4f}"
                     f"{difference:>+10.4f}   {f'[{low:+.4f}, {high:+.4f}]':<20}"
                     f"  {100 * result.ahead[key]:5.1f}%")
    terms = result.imp_over
    notes = [f"over {', '.join(terms)}"] if terms and set(terms) != set(METRICS) else []
    if result.imp_undefined:
        notes.append(f"B's {', '.join(result.imp_undefined)} = 0")
    notes += [f"B's {key} = 0 in {count:,} of the resamples"
              for key, count in result.imp_unresolved.items()]
    over = f" ({'; '.join(notes)})" if notes else ""
    if result.imp is None or result.imp_interval is None or result.imp_positive is None:
        lines.append(f"  Imp of A over B{over} undefined")
    else:
        low, high = result.imp_interval
        lines.append(f"  Imp of A over B{over} {100 * result.imp:+.2f}% "
                     f"[{100 * low:+.2f}%, {100 * high:+.2f}%]; "
                     f"> 0 in {100 * result.imp_positive:.1f}% of the resamples")
    return "\n".join(lines)


def format_metrics(name: str, split: str, users: int, metrics: dict[str, float],
                   as_json: bool) -> str:
    """The metric table of one model, or one JSON object."""
    if as_json:
        return json.dumps({"model": name, "split": split, "users": users, **metrics})
    rows = "\n".join(f"  {key:<12}{value:.4f}" for key, value in metrics.items())
    return f"{name} on {split} ({users:,} users)\n{rows}"


def _run(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_writable
    from morec_rec.jobs.job import JOB, read_job, run_job
    from morec_rec.jobs.run import recorded_data

    if not (args.resume or _is_restart(args.out / JOB, args.data)):
        if args.data is None:
            raise MorecError("run needs --data (or --resume)")
        train, sampler, morec = _job_configs(args, _base_model(args.base))
        dataset = PreparedDataset.open(args.data)
        _check_job(dataset, args.base, train, sampler)
        check_writable(args.out)
        _print_results(run_job(dataset, args.out, train, sampler, morec, base=args.base,
                               with_continued=args.continued), args.out)
        return
    if args.resume and (args.data is not None or args.base is not None
                        or args.config is not None):
        raise MorecError("--resume continues the job's own data, base and settings: "
                         "drop --data, --base and --config")
    job = read_job(args.out)
    train, sampler, morec = _build_job(job, args, args.out / JOB)
    _keep_job_settings(args.out, job, train, sampler, morec)
    dataset = recorded_data(job, args.out / JOB)
    _check_job(dataset, job["base"], train, sampler)
    _print_results(run_job(dataset, args.out, train, sampler, morec, base=job["base"],
                           with_continued=job["continued"] or args.continued, resume=True),
                   args.out)


def _base_model(base: Path | None) -> dict[str, dict[str, Any]]:
    """The model settings of the run ``base`` (its model, embedding size, table optimizer
    and dropout), as the defaults of a job that continues it; none without a base."""
    from morec_rec.jobs.run import Run
    from morec_rec.jobs.train import MODEL_SETTINGS

    if base is None:
        return {}
    recorded = Run.open(base).record["config"]
    return {"train": {name: recorded[name] for name in (*MODEL_SETTINGS, "dropout")
                      if name in recorded}}


def _is_restart(record: Path, data: Path | None) -> bool:
    """Whether this process is a torchrun restart (``--max-restarts``) of the job whose
    ``record`` (``run.json`` or ``job.json``) is there: it then resumes from the last
    checkpoint, as ``--resume`` does. Raises :class:`MorecError` if that job's data is
    not ``data``."""
    from morec_rec.jobs import distributed
    from morec_rec.jobs.run import read_record

    if not distributed.restart_count() or not record.is_file():
        return False
    recorded = Path(read_record(record, ("data",))["data"])
    if data is None or data.resolve() != recorded.resolve():
        raise MorecError(f"{record}: torchrun restarted a job on {recorded}, not on --data {data}")
    return True


def _check_training(dataset: PreparedDataset, config: TrainConfig, world_size: int) -> None:
    """Raises :class:`MorecError` unless ``config``'s backbone can learn from the data and
    a batch of it fits each loader stream."""
    from morec_rec.jobs.models import check_backbone

    check_backbone(config.model, dataset.manifest["history_length"], config.embedding_dim)
    dataset.check_batch(config.batch_size, world_size * max(config.num_workers, 1),
                        f"batch_size = {config.batch_size}")


def _check_job(dataset: PreparedDataset, base: Path | str | None, train: TrainConfig,
               sampler: SamplerConfig) -> None:
    """Checks, before a job writes anything, what would fail it later: its backbone learns
    from the data and its batches fit the data's loader streams, and a given ``base`` is a
    run of the same model on the same data with a best checkpoint. (The job checks its
    objectives and controllers itself.)"""
    from morec_rec.jobs import checkpoint, distributed
    from morec_rec.jobs.run import RECORD, Run, check_same_data
    from morec_rec.jobs.train import model_identity

    env = distributed.init()
    world_size = env.world_size
    if base is None:
        _check_training(dataset, train, world_size)
    else:
        run = Run.open(Path(base))
        data = Path(run.record["data"]).resolve()
        if data != dataset.root.resolve():
            raise MorecError(f"{base}: a base trained on {data}, not on {dataset.root}")
        check_same_data(run.record, dataset, run.root / RECORD)
        if checkpoint.resolve(run.best) is None:
            raise MorecError(f"{base}: a base without a best checkpoint: nothing to continue")
        meta = checkpoint.read_meta(run.best)
        wrong = [f"{key} = {value!r} (the base's: {recorded!r})" for key, (recorded, value)
                 in checkpoint.mismatches(meta, model_identity(train, dataset)).items()]
        if wrong:
            raise MorecError(f"{base}: the base's model differs from the settings: "
                             f"{', '.join(wrong)}")
        unfinished = _unfinished(run)
        if env.is_main and unfinished:
            print(f"morec-rec: warning: {base}: unfinished run ({unfinished}): continuing "
                  "its best checkpoint so far", file=sys.stderr)
    objectives = len(sampler.objectives)
    dataset.check_batch(sampler.sub_batch_size * objectives,
                        world_size * max(train.num_workers, 1),
                        f"sub_batch_size = {sampler.sub_batch_size} × {objectives} objective(s)")


def _keep_settings(record: Path, recorded: dict[str, Any], config: Any, flags: str,
                   table: str = "config") -> bool:
    """Raises :class:`MorecError` naming the first setting of ``config`` (a config
    dataclass) that differs from its value ``recorded`` in ``record`` (its ``table``) and
    is not one of :data:`RESUMABLE` (whose ``flags`` the message lists); returns whether
    one of those differs."""
    started = build(type(config), recorded, None, f"{record}: {table}")
    for field in dataclasses.fields(config):
        old, new = getattr(started, field.name), getattr(config, field.name)
        if old != new and field.name not in RESUMABLE:
            raise MorecError(f"{record}: started with {field.name} = {old!r}, not {new!r}; a "
                             f"resume may change only {flags}")
    return started != config


def _keep_job_settings(out: Path, job: dict[str, Any], train: TrainConfig,
                       sampler: SamplerConfig, morec: MoRecConfig) -> bool:
    """:func:`_keep_settings` for each config of the job in ``out``, before it is resumed;
    whether any of them changes."""
    from morec_rec.jobs.job import JOB
    from morec_rec.jobs.run import RECORD

    changed = [_keep_settings(out / JOB, job[name], config, _resumable(*JOB_CONFIGS), name)
               for name, config in (("train", train), ("sampler", sampler), ("morec", morec))]
    if job["base"] is None:
        _keep_epochs(out / "base", train.max_epochs, "--max-epochs")
        if (out / "morec" / RECORD).is_file():
            # Training the base on would change the best checkpoint MoRec continued.
            started = build(TrainConfig, job["train"], None)  # checked above
            moved = [f"--{name.replace('_', '-')}" for name in ("max_epochs", "patience")
                     if getattr(train, name) != getattr(started, name)]
            if moved:
                raise MorecError(f"{out}: its MoRec stage continues the base's best checkpoint, "
                                 f"so {' and '.join(moved)}, which train the base on, can no "
                                 "longer change: start a new job with them")
    for stage in ("morec", "continued"):
        _keep_epochs(out / stage, morec.epochs, "--epochs")
    return any(changed)


def _keep_epochs(root: Path, epochs: int, flag: str) -> None:
    """Raises :class:`MorecError` if the run at ``root`` (if any) has trained more than
    ``epochs`` epochs: a resume may train a run on, not undo its training."""
    from morec_rec.jobs import checkpoint
    from morec_rec.jobs.run import RECORD, Run

    last = Run(root).last
    if not (root / RECORD).is_file() or checkpoint.resolve(last) is None:
        return
    done = checkpoint.read_meta(last, ("progress",))["progress"].get("epoch", 0)
    if epochs < done:
        raise MorecError(f"{root}: {done} epoch(s) trained already, more than {flag} {epochs}; "
                         "a resume trains a run on, it cannot undo its training")


def _resumable(*configs: type) -> str:
    """The flags of the :data:`RESUMABLE` settings that the dataclasses ``configs`` hold."""
    names = {field.name for config in configs for field in dataclasses.fields(config)}
    return ", ".join("--" + name.replace("_", "-") for name in RESUMABLE if name in names)


def _print_results(results: dict[str, Any], out: Path) -> None:
    from morec_rec.jobs import distributed

    if not distributed.init().is_main:
        return
    # The coordinated run is ``morec`` in the results, whichever coordinator it had.
    coordinator = results["settings"]["morec"]["coordinator"]
    rows = {"base": "base", "continued": "continued", "morec": coordinator}
    keys = list(results["base"])
    print(f"{'':<12}" + "".join(f"{key:>12}" for key in keys))
    for name, label in rows.items():
        if name in results:
            print(f"{label:<12}" + "".join(f"{results[name][key]:>12.4f}" for key in keys))
    title = {"morec": "MoRec", "static": "Static weights"}.get(coordinator, coordinator.upper())
    base_hit, hit = results["base"]["hit@10"], results["morec"]["hit@10"]
    share = f"hit@10 {hit / base_hit:.1%} of the base's" if base_hit else "hit@10"
    print(f"{title} against the base on test: {results['imp_text']}, "
          f"{'valid' if results['valid'] else 'INVALID'} ({share}; valid from "
          f"{VALIDITY_THRESHOLD:.0%})")
    for name, held in results["control"].items():
        print(f"controller of {name}, last fifth of training: mean "
              f"{held['mean']:.4f} against target {held['target']:.4f} "
              f"({100 * held['relative_error']:+.1f}%), β at a bound in "
              f"{100 * held['share_at_bound']:.0f}% of the steps")
    print(f"results and plots in {out}")


def _demo(args: argparse.Namespace) -> None:
    from morec_rec.data.prepare import check_writable
    from morec_rec.jobs.job import JOB, RESULT_KEYS, RESULTS, read_job, run_job
    from morec_rec.jobs.run import read_record

    train, sampler, morec = _job_configs(args, DEMO_SETTINGS)
    data = args.out / "data"
    check_writable(args.out)
    config = PrepareConfig(seed=train.seed)
    if (data / MANIFEST).is_file():  # a rerun reuses the data it prepared before
        manifest = PreparedDataset.open(data).manifest
        if manifest["source"].get("profile") != DEMO_PROFILE or manifest["parameters"] != (
            dataclasses.asdict(config)
        ):
            raise MorecError(f"{data}: holds other data than the demo's (seed {train.seed}); "
                             "choose another --out")
    else:
        manifest = synthesize(DEMO_PROFILE, data, config)
        print(summary(data, manifest))
    resume = (args.out / JOB).is_file()
    if resume:
        changed = _keep_job_settings(args.out, read_job(args.out), train, sampler, morec)
        if (args.out / RESULTS).is_file() and not changed:
            # A finished demo, asked for nothing more: its results again.
            print(f"the finished demo in {args.out} (remove it to run the demo again):")
            _print_results(read_record(args.out / RESULTS, RESULT_KEYS), args.out)
            return
    # An interrupted demo, or a finished one asked for more, goes on where it stopped.
    dataset = PreparedDataset.open(data)
    _check_job(dataset, None, train, sampler)
    _print_results(run_job(dataset, args.out, train, sampler, morec, resume=resume), args.out)


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
