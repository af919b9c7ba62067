"""The `chmr-jax` command: `chmr-jax <command> [flags]`.

Commands: prepare (featurize and split benchmarks or a CSV, or build a corpus), pretrain, finetune,
benchmark, stress, embed, convert, report, compile.
`chmr-jax <command> --help` lists a command's flags.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import time

COMMANDS = {"prepare": "featurize and split the benchmarks (or a CSV), or build a pretraining corpus",
            "pretrain": "pretrain CHMR from a config file into a workdir (resumes from its checkpoints)",
            "finetune": "fine-tune on a benchmark or CSV over seeds (frozen or full encoder, baselines)",
            "benchmark": "finetune on several benchmarks and write a results table with the paper's numbers",
            "stress": "hide cellular profiles at several levels, pretrain + finetune each, table and plot",
            "embed": "embeddings, tree codes and straight-through vectors for molecules (NumPy, Parquet, TFDS shards)",
            "convert": "import the authors' PyTorch checkpoint (state_dict .pt) as a chmr_jax workdir",
            "report": "PNG plots of a pretraining run: losses, tree-code usage, embedding maps, task enrichment",
            "compile": "compile the pretraining step for a TPU topology without a TPU: per-chip memory, estimates"}

PRETRAIN_USAGE = """chmr-jax pretrain --config configs/pretrain.py[:variant] --workdir DIR [--config.a.b=value ...]

Pretrains CHMR as the config says. Any config field can be overridden, e.g.
  --config.train.steps=300 --config.optim.lr=3e-4 --config.batch.batch_size=512
Restarting the same command in the same workdir continues from the newest checkpoint.
Multi-host (TPU pods, GPU clusters): run the same command on every host with --config.train.distributed=True
(or --config.train.coordinator_address=HOST:PORT --config.train.num_processes=N --config.train.process_id=I)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the house's one-line errors (no usage block): an unknown flag names the closest
    known one, e.g. `chmr-jax prepare: unknown flag --datset; did you mean --dataset? (...)`; exit 2."""

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            words = message.split(": ", 1)[1].split()
            typed = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            parts = []
            for t in typed:
                close = difflib.get_close_matches(t, known, n=1, cutoff=0.6)
                parts.append(f"unknown flag {t}" + (f"; did you mean {close[0]}?" if close else ""))
            message = "; ".join(parts) or f"unexpected argument(s) {' '.join(words)}"
        print(f"{self.prog}: {message} ({self.prog} --help lists the flags)", file=sys.stderr)
        sys.exit(2)


def _prepare(argv: list[str]) -> int:
    from chmr_jax import config_util
    from chmr_jax.data import datasets, featurize, paths, prepare

    parser = _Parser(prog="chmr-jax prepare", description=COMMANDS["prepare"])
    parser.add_argument("--dataset", default="all",
                        help="'all', one benchmark, or a comma list of: " + ", ".join(datasets.ALL_BENCHMARKS))
    parser.add_argument("--csv", help="a CSV with a SMILES column to prepare instead of a benchmark")
    parser.add_argument("--smiles_column", default="smiles")
    parser.add_argument("--task_columns", help="comma list of task columns (default: all after SMILES)")
    parser.add_argument("--task_type", choices=["classification", "regression"],
                        help="override the inferred task type of --csv")
    parser.add_argument("--split", choices=["paper_scaffold", "key_scaffold", "ogb_scaffold", "random"],
                        help="split kind (default: the dataset's protocol)")
    parser.add_argument("--geometry", default="none",
                        help="3D modality: 'none', 'rdkit3d' (ETKDG + RDKit 3D descriptors, ~30 ms/molecule "
                             "per core) or a .npz/.csv matrix keyed by 14-char InChIKey block (e.g. Uni-Mol)")
    parser.add_argument("--data_dir", help=f"data directory (default: ${paths.DATA_ENV} or ~/.cache/chmr_jax)")
    parser.add_argument("--cache_dir", help=f"feature cache (default: ${paths.CACHE_ENV} or ~/.cache/chmr_jax/features)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--max_atoms", type=int, default=featurize.FeaturizerSettings.max_atoms)
    parser.add_argument("--morgan_radius", type=int, default=featurize.FeaturizerSettings.morgan_radius)
    parser.add_argument("--morgan_size", type=int, default=featurize.FeaturizerSettings.morgan_size)
    corpus = parser.add_argument_group("pretraining corpus (instead of benchmarks)")
    corpus.add_argument("--corpus", choices=["reachable", "paper", "synthetic"],
                        help="build a corpus: the real files reachable offline, the paper's layout "
                             "(--corpus_path), or a generated one in that layout")
    corpus.add_argument("--config", help="config file[:variant] for the corpus settings (default configs/default.py)")
    corpus.add_argument("--corpus_path", help="for --corpus paper: the directory with structure.csv.gz etc.")
    corpus.add_argument("--exclude_test", help="leakage guard: leave out these molecules (structures and profiles): "
                        "'all', benchmark names (their test split) and/or CSV files of SMILES, comma separated")
    corpus.add_argument("--exclude_split", help="the split the excluded benchmarks are evaluated with "
                        "(default: each benchmark's own protocol; e.g. key_scaffold)")
    corpus.add_argument("--join", choices=["inchikey14", "inchikey"])
    corpus.add_argument("--aggregate", choices=["median", "mean", "first"])
    corpus.add_argument("--out", help="where to save the corpus (default <cache_dir>/corpus-<kind>[-no-<benchmark>-test])")
    args = parser.parse_args(argv)
    if args.corpus:
        return _prepare_corpus(args)

    settings = featurize.FeaturizerSettings(morgan_radius=args.morgan_radius, morgan_size=args.morgan_size,
                                            max_atoms=args.max_atoms)
    cache_dir = paths.resolve_cache_dir(args.cache_dir)
    data_dir = paths.resolve_data_dir(args.data_dir)
    if args.csv:
        tasks = config_util.parse_list(args.task_columns) or None
        loaders = [lambda: datasets.load_csv(args.csv, args.smiles_column, tasks, args.task_type,
                                             cache_dir=cache_dir, n_workers=args.workers, flags=_CSV_FLAGS)]
    else:
        names = datasets.ALL_BENCHMARKS if args.dataset == "all" else config_util.parse_list(args.dataset)
        unknown = [n for n in names if n not in datasets.BENCHMARKS]
        if unknown or not names:
            parser.error(f"unknown dataset(s) {unknown or args.dataset!r}; choose from {list(datasets.ALL_BENCHMARKS)} or use --csv")
        loaders = [lambda n=n: datasets.load_benchmark(n, data_dir, cache_dir, args.workers) for n in names]

    print(f"data_dir={data_dir}  cache_dir={cache_dir}  settings={settings}", flush=True)
    start = time.perf_counter()
    rows, rejects_files = [], []
    for load in loaders:
        t0 = time.perf_counter()
        ds = load()
        prepared = prepare.prepare(ds, settings, cache_dir, args.split, args.geometry,
                                   n_workers=args.workers)
        prepared.seconds = time.perf_counter() - t0
        rows.append(prepared.row())
        if args.csv and not args.task_columns:   # the default task list, said (never widened silently)
            print(f"{ds.name}: tasks {', '.join(ds.task_names)} (every column after {args.smiles_column!r}; "
                  "--task_columns chooses)", flush=True)
        if prepared.rejects_file is not None:
            rejects_files.append(prepared.rejects_file)
        paths.push(cache_dir, "--cache_dir")   # a gs:// cache (a local mirror): each dataset uploaded when done
    wall = time.perf_counter() - start
    print(prepare.format_table(rows))
    n_mol = sum(r["molecules"] for r in rows)
    n_rej = sum(r["rejects"] for r in rows)
    print(f"prepared {len(rows)} dataset(s): {n_mol} molecules, {n_rej} rejected, "
          f"{wall:.1f}s wall ({n_mol / max(wall, 1e-9):,.0f} molecules/s incl. cache hits)")
    if rejects_files:   # (row: the 0-based data row, header excluded, as in embed's manifest)
        print(f"rejected molecules (row, smiles, reason) are listed in {', '.join(map(str, rejects_files))}")
    return 0


def _exclude_tag(spec: str) -> str:
    """A folder-name tag for corpus.exclude: benchmark names as given, a CSV by its file stem."""
    from pathlib import Path

    from chmr_jax import config_util
    return "+".join(Path(p).name.split(".")[0] if p.lower().endswith((".csv", ".csv.gz")) else p
                    for p in config_util.parse_list(spec))


def _prepare_corpus(args) -> int:
    from chmr_jax import config_util
    from chmr_jax.data import datasets, featurize, paths, prepare, records
    from chmr_jax.data import corpus as corpus_lib

    # The paper's layout (real or synthetic) uses the 'paper' variant: six modalities, no benchmarks.
    paper_variant = f"{config_util.DEFAULT_CONFIG}:paper" if args.corpus in ("paper", "synthetic") else None
    config = config_util.load_config(args.config or paper_variant)
    cfg = config.corpus
    cfg.kind = args.corpus
    if args.exclude_test:   # named by its flag here (corpus.exclude is the config's name for it)
        unknown = [n for n in config_util.parse_list(args.exclude_test) if n not in datasets.ALL_BENCHMARKS
                   and n != "all" and not n.lower().endswith((".csv", ".csv.gz"))]   # (a CSV of SMILES: not a name)
        if unknown:
            close = difflib.get_close_matches(unknown[0], datasets.ALL_BENCHMARKS, n=1)
            print(f"chmr-jax prepare: --exclude_test {args.exclude_test}: unknown benchmark(s) {unknown}"
                  f"{f'; did you mean {close[0]}?' if close else ''} (choose from {', '.join(datasets.ALL_BENCHMARKS)} "
                  "or all)", file=sys.stderr)
            return 2
    for flag, field in (("corpus_path", "path"), ("exclude_test", "exclude"), ("exclude_split", "exclude_split"),
                        ("join", "join"),
                        ("aggregate", "aggregate")):
        if getattr(args, flag):
            setattr(cfg, field, getattr(args, flag))
    settings = featurize.FeaturizerSettings.from_config(config.featurize)
    cache_dir = paths.resolve_cache_dir(args.cache_dir)
    data_dir = paths.resolve_data_dir(args.data_dir)
    start = time.perf_counter()
    inputs = prepare.corpus_inputs(cfg, settings, data_dir, cache_dir, args.workers)
    digest = prepare.corpus_settings_digest(cfg, settings)
    out = args.out or cache_dir / (f"corpus-{cfg.kind}" + (f"-no-{_exclude_tag(cfg.exclude)}-test" if cfg.exclude else ""))
    # Per-molecule records (data/records.py), this one process featurizing every molecule (P=1).
    if paths.is_remote(out):   # written in a fresh local folder, then uploaded
        with paths.staged(out, "--out") as local:
            records.build(inputs, local, records.Share(), digest, log=print, show_progress=True)
            corpus = corpus_lib.Corpus.load(local)
            paths.push(local, "--out", to=out)
    else:
        records.build(inputs, out, records.Share(), digest, log=print, show_progress=True)
        corpus = corpus_lib.Corpus.load(out)
    paths.push(cache_dir, "--cache_dir")
    print(prepare.format_table(corpus_lib.summary_rows(corpus)))
    if cfg.include_benchmarks:
        groups = prepare.benchmark_keys(datasets.ALL_BENCHMARKS, cfg.join, data_dir, cache_dir, args.workers)
        print("\noverlap with the benchmarks (molecules with each modality observed):")
        print(prepare.format_table(corpus_lib.overlap_table(corpus, groups)))
    c = corpus.manifest["counts"]
    print(f"\n{len(corpus)} molecules; {c['featurize_rejects']} rejected by the featurizer, "
          f"{c['structures_unparsable']} unparsable structures, {c['excluded_leakage']} excluded by the leakage guard"
          + (f" (profile rows lost: {c['excluded_profile_rows']})" if c.get('excluded_profile_rows') else ""))
    for name, info in corpus.manifest["modalities"].items():
        for source, sc in info["source_counts"].items():
            print(f"  {name} <- {source}: {sc['rows']} profiles, {sc['molecules']} molecules, "
                  f"{sc['replicate_rows_merged']} replicates merged, {sc['skipped_by_importer']} skipped "
                  f"(no/unparsable structure), {sc['not_in_corpus']} not in the corpus, "
                  f"{sc['dropped_nan_rows']} dropped (NaN), {sc['inf_entries']} inf entries")
    print(f"saved to {out} in {time.perf_counter() - start:.1f}s")
    return 0


# How load_csv's errors name its settings when the user typed `chmr-jax prepare` flags.
_CSV_FLAGS = {"smiles_column": "--smiles_column ", "task_columns": "--task_columns "}


def _config_spec(argv: list[str], default: str) -> str:
    """The `--config FILE[:ARGS]` (or `--config=...`) value in argv, else `default`."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _flags_help(fv, usage: str, default_config: str) -> str:
    """`usage` followed by every flag of the command's private registry with its help and default."""
    lines = [usage, "", "flags:",
             f"  --config FILE[:ARGS]      config file and its get_config argument (default: {default_config})",
             "  --config.a.b=VALUE        override any field of the config (see its get_config)"]
    for name in sorted(fv):
        if name == "config" or name.startswith("config."):
            continue
        flag = fv[name]
        default = "" if flag.default is None else f" (default: {flag.default})"
        lines.append(f"  --{name:24s}{flag.help}{default}")
    return "\n".join(lines)


def _config_flags(argv: list[str], command: str, default_config: str, usage: str, define_more=None,
                  required=("workdir",), workdir: bool = True):
    """Parses `--config file.py[:arg] --config.a.b=v ... --other` with absl on a private registry.

    Returns the FlagValues, or an exit code (help printed, or a user error explained in one line:
    a missing config file, a bad config argument, an unknown override, a bad flag value, a missing
    `required` flag)."""
    from absl import flags
    from ml_collections import config_flags

    from chmr_jax import config_util

    fv = flags.FlagValues()   # a private registry: main() can run more than once in a process
    default_spec = str(config_util.CONFIG_DIR / default_config)
    config_flags.DEFINE_config_file("config", default_spec,
                                    "config file[:variant]", flag_values=fv, lock_config=True,
                                    sys_argv=[f"chmr-jax {command}"] + argv)  # overrides are found from argv
    if workdir:   # (compile writes no workdir)
        flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "data directory (default: config.data_dir > $CHMR_DATA_DIR > "
                        "~/.cache/chmr_jax)", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "feature cache (default: config.cache_dir > $CHMR_CACHE_DIR > "
                        "~/.cache/chmr_jax/features)", flag_values=fv)
    if define_more is not None:
        define_more(flags, fv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(_flags_help(fv, usage, default_spec))
        return 0
    # The config file and its overrides are checked here first: absl's loader answers a missing file or
    # a bad get_config argument with chained tracebacks, and an unknown field with a repr'd KeyError.
    try:
        config = config_util.load_config(_config_spec(argv, default_spec))
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"chmr-jax {command}: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    for a in argv:
        if a.startswith("--config."):
            problem = config_util.check_override(config, a[len("--config."):].split("=", 1)[0])
            if problem:
                print(f"chmr-jax {command}: {problem}", file=sys.stderr)
                return 2
    try:
        leftover = fv([f"chmr-jax {command}"] + argv)[1:]
        if leftover:   # absl keeps stray words: `finetune ... bbbp` would silently train the config's dataset
            print(f"chmr-jax {command}: unexpected argument(s) {' '.join(leftover)} (every value is a --flag or "
                  f"--config.field=value; chmr-jax {command} --help lists the flags)", file=sys.stderr)
            return 2
    except flags.Error as e:
        print(f"chmr-jax {command}: {e} (chmr-jax {command} --help lists the flags)", file=sys.stderr)
        return 2
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # config_flags raises these for an override of the wrong type (unknown fields were caught above).
        message = e.args[0] if e.args else e
        print(f"chmr-jax {command}: bad config override ({type(e).__name__}: {message}); fields must exist in "
              "the config file (see its get_config)", file=sys.stderr)
        return 2
    for name in required:
        if not fv[name].value:
            print(f"chmr-jax {command}: --{name} is required (chmr-jax {command} --help lists the flags)",
                  file=sys.stderr)
            return 2
    if fv.cache_dir:
        fv.config.cache_dir = fv.cache_dir
    return fv


# Exit codes (README "Exit codes"): 0 done; 1 a diverged run, or a bug (its traceback); 2 an error in what
# the user gave (a file, a row, a flag, a config value, a workdir to decide about), reported in one line: the
# same command fails again; 3 a storage or environment fault (a bucket that does not answer, an I/O error,
# a storage library's error), one line: the same command may succeed later, so an orchestrator retries it.
# CHMR_TRACEBACK=1 shows the traceback instead of the line.
USER_ERRORS = ("FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "FileExistsError", "PermissionError",
               "ValueError", "CorpusError", "DataNotFoundError", "ConfigError", "CorruptCheckpoint", "BucketNotFound")
ENVIRONMENT_ERRORS = ("StorageUnreachable", "CheckpointIOError")
# An OSError raised inside these (the files of a gs:// workdir or cache, not a path the user named) is a
# storage fault, e.g. gcsfs's FileNotFoundError for an object that vanished under a listing.
STORAGE_MODULES = ("gcsfs", "fsspec", "etils", "orbax", "tensorstore", "google", "aiohttp", "requests", "urllib3")
# Errors of the storage and credential libraries' own classes (not OSError): gcsfs's HttpError after its
# retries (a 5xx), google.auth's RefreshError / TransportError (an expired or unreachable credential).
STORAGE_ERROR_PACKAGES = ("gcsfs", "google", "aiohttp", "requests", "urllib3")


def is_user_error(e: BaseException) -> bool:
    return exit_code_of(e) == 2


def exit_code_of(e: BaseException) -> int | None:
    """2 for an error in what the user gave, 3 for a storage / environment fault, None for anything else
    (a bug: raised with its traceback)."""
    names = {cls.__name__ for cls in type(e).__mro__}
    if "BucketNotFound" in names:
        return 2
    if names & set(ENVIRONMENT_ERRORS):
        return 3
    if isinstance(e, OSError) and _raised_in(e, STORAGE_MODULES):
        return 3
    if type(e).__module__.split(".")[0] in STORAGE_ERROR_PACKAGES:
        return 3
    if names & set(USER_ERRORS):
        return 2
    return 3 if isinstance(e, OSError) else None   # (a full disk, a refused connection, a permission)


def _raised_in(e: BaseException, modules) -> bool:
    """Whether the innermost frame of e's traceback is in one of `modules` (top-level package names)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] in modules


def _user_error(command: str, e: BaseException) -> int:
    """Reports an expected error in one line on stderr naming the command; exit code 2 (what the user gave)
    or 3 (storage / environment; exit_code_of). With CHMR_TRACEBACK set it is re-raised (from inside the
    caller's `except`)."""
    if os.environ.get("CHMR_TRACEBACK"):
        raise e
    code = exit_code_of(e) or 2
    if code == 3 and not {c.__name__ for c in type(e).__mro__} & set(ENVIRONMENT_ERRORS):   # (those say it)
        e = f"storage or environment fault ({type(e).__name__}: {e}); nothing in the command is wrong: run it " \
            "again (a pretraining run resumes from its last checkpoint)"
    print(f"chmr-jax {command}: {e}", file=sys.stderr)
    return code


def _report_errors(command: str, call, errors=(FileNotFoundError, ValueError)) -> int:
    """Runs `call`; an expected error (`errors`, e.g. a command's own KeyError) is a user error."""
    try:
        call()
    except errors as e:
        return _user_error(command, e)
    return 0


def _pretrain(argv: list[str]) -> int:
    fv = _config_flags(argv, "pretrain", "pretrain.py", PRETRAIN_USAGE)
    if isinstance(fv, int):
        return fv
    config = fv.config
    t = config.train
    if t.distributed or t.coordinator_address:
        import jax
        # CPU processes (tests, laptops) need a collectives backend between them; a no-op on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Before any other jax call touches the devices. A lost peer is detected by the coordination
        # service's heartbeat (config.train.heartbeat_timeout_s) and ends the others with an error.
        jax.distributed.initialize(t.coordinator_address or None, t.num_processes or None,
                                   None if t.process_id < 0 else t.process_id,
                                   heartbeat_timeout_seconds=int(t.heartbeat_timeout_s))

    from chmr_jax.training import pretrain
    try:   # (bad configs and data files are user errors: `main` reports them and exits 2)
        pretrain.run(config, fv.workdir, data_dir=fv.data_dir)
    except pretrain.TrainingDiverged as e:
        print(f"chmr-jax pretrain: {e}", file=sys.stderr)
        return 1
    return 0


FINETUNE_USAGE = """chmr-jax finetune --config configs/finetune.py[:dataset=NAME,seeds=0,1,...] --pretrained DIR --workdir OUT

Trains a prediction head on the frozen encoder of a `chmr-jax pretrain` workdir (eval mode) for one
benchmark (or --config.csv=file.csv), one run per seed; writes OUT/results.json (valid/test scores at
the best validation epoch, mean +- std). An OUT/results.json of the same settings (config, encoder
checkpoint, CSV content) is reused, not recomputed; with other baselines only the missing ones are computed.
Options (configs/finetune.py): --config.encoder=finetune (train the whole encoder),
--config.baselines=mlp,rf,gnn, --config.ensemble.enabled=True (head + RF), --config.head.parts=... (add
'tree' or cellular modalities)."""


def _finetune(argv: list[str]) -> int:
    def more(flags, fv):
        flags.DEFINE_string("pretrained", None, "a `chmr-jax pretrain` workdir", flag_values=fv)

    fv = _config_flags(argv, "finetune", "finetune.py", FINETUNE_USAGE, more, required=("workdir", "pretrained"))
    if isinstance(fv, int):
        return fv
    from chmr_jax.data import registry
    from chmr_jax.downstream import finetune
    return _report_errors("finetune", lambda: finetune.run_or_reuse(fv.config, fv.pretrained, fv.workdir, fv.data_dir),
                          (FileNotFoundError, ValueError, registry.DataNotFoundError))


BENCHMARK_USAGE = """chmr-jax benchmark --datasets all|a,b,... --pretrained DIR --workdir OUT [--config configs/finetune.py[:ARGS]]
    [--config.seeds=0,1,2,3,4] [--config.baselines=mlp,rf,gnn] [--config.ensemble.enabled=True] [--config.a.b=v ...]

Runs `chmr-jax finetune` on each dataset (frozen encoder, one head per seed) with the in-house
baselines (config.baselines) on the same splits and seeds, and writes OUT/results.md and
OUT/results.json: mean +- std per dataset and method next to the paper's published numbers. The
default config is configs/finetune.py:baselines=mlp,rf,gnn (all three baselines; --config.baselines=
for none). A dataset whose OUT/<dataset>/results.json matches the settings is reused, so an
interrupted run continues; re-running with more baselines computes only the new ones. --table_only
tabulates the datasets finished so far without computing anything."""


def _benchmark(argv: list[str]) -> int:
    def more(flags, fv):
        flags.DEFINE_string("pretrained", None, "a `chmr-jax pretrain` workdir", flag_values=fv)
        flags.DEFINE_string("datasets", "all", "'all' (the 9 benchmarks) or a comma list", flag_values=fv)
        flags.DEFINE_bool("table_only", False, "compute nothing: tabulate the finished datasets in --workdir "
                          "(results.md, results.json, lift.json) with the methods each holds", flag_values=fv)

    fv = _config_flags(argv, "benchmark", "finetune.py:baselines=mlp,rf,gnn", BENCHMARK_USAGE, more,
                       required=("workdir", "pretrained"))
    if isinstance(fv, int):
        return fv
    from chmr_jax import config_util
    from chmr_jax.data import datasets, registry
    from chmr_jax.downstream import benchmark
    names = list(datasets.ALL_BENCHMARKS) if fv.datasets == "all" else config_util.parse_list(fv.datasets)
    unknown = [n for n in names if n not in datasets.BENCHMARKS]
    if unknown or not names:
        print(f"chmr-jax benchmark: unknown dataset(s) {unknown or fv.datasets!r}; choose from {list(datasets.ALL_BENCHMARKS)}",
              file=sys.stderr)
        return 2
    config = fv.config.copy_and_resolve_references()
    return _report_errors("benchmark", lambda: benchmark.run_benchmark(config, fv.pretrained, fv.workdir, names,
                                                                      data_dir=fv.data_dir,
                                                                      command="chmr-jax benchmark " + " ".join(argv),
                                                                      table_only=fv.table_only),
                          (FileNotFoundError, ValueError, registry.DataNotFoundError))


STRESS_USAGE = """chmr-jax stress --workdir OUT [--config configs/pretrain.py] [--missing 0,0.2,0.4,0.6,0.8,0.9]
    [--imputations propagate,mean,zero] [--dataset chembl2k] [--seeds 0] [--steps 200] [--config.a.b=v ...]

Missing-modality stress test: hides a further fraction of the observed cellular profiles (per level),
pretrains a short schedule per level and imputation (propagation vs mean vs zero for the missing rows)
and fine-tunes on --dataset; writes OUT/results.md, results.json and stress.png. Re-running continues:
finished pretraining runs and fine-tuning results are reused."""


def _stress(argv: list[str]) -> int:
    def more(flags, fv):
        flags.DEFINE_string("missing", "0,0.2,0.4,0.6,0.8,0.9", "extra fractions of observed profiles to hide",
                            flag_values=fv)
        flags.DEFINE_string("imputations", "propagate,mean,zero", "main-input imputations to compare",
                            flag_values=fv)
        flags.DEFINE_string("dataset", "chembl2k", "benchmark to fine-tune on", flag_values=fv)
        flags.DEFINE_string("seeds", "0", "fine-tuning seeds (comma list)", flag_values=fv)
        flags.DEFINE_integer("steps", 200, "pretraining steps per run (0: the config's full schedule)",
                             flag_values=fv)
        flags.DEFINE_string("finetune_config", None, "fine-tuning config file[:args] (default "
                            "configs/finetune.py)", flag_values=fv)
        flags.DEFINE_integer("finetune_epochs", None, "override the fine-tuning epochs", flag_values=fv)
        flags.DEFINE_integer("hide_seed", 0, "seed choosing the profiles to hide", flag_values=fv)
        flags.DEFINE_bool("structure_only", True, "also pretrain once without cellular modalities (the "
                          "structure-only arm: what the profiles add beyond the structure objective)", flag_values=fv)

    fv = _config_flags(argv, "stress", "pretrain.py", STRESS_USAGE, more)
    if isinstance(fv, int):
        return fv
    from chmr_jax import config_util
    from chmr_jax.downstream import stress
    from chmr_jax.training import pretrain
    config = fv.config.copy_and_resolve_references()
    if fv.steps:
        config.train.steps = fv.steps
    try:
        ft = config_util.load_config(fv.finetune_config or str(config_util.CONFIG_DIR / "finetune.py"))
        ft.dataset, ft.seeds = fv.dataset, fv.seeds
        ft.cache_dir = ft.cache_dir or config.cache_dir
        if fv.finetune_epochs:
            ft.optim.epochs = fv.finetune_epochs
        levels = config_util.parse_list(fv.missing, float, "--missing")
        stress.run(config, ft, levels, config_util.parse_list(fv.imputations), fv.workdir,
                   data_dir=fv.data_dir, hide_seed=fv.hide_seed, structure_only=fv.structure_only)
    except pretrain.TrainingDiverged as e:   # (user errors: `main` reports them and exits 2)
        print(f"chmr-jax stress: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"chmr-jax stress: interrupted: {e}", file=sys.stderr)
        return 130
    return 0


def _embed(argv: list[str]) -> int:
    parser = _Parser(prog="chmr-jax embed", description=COMMANDS["embed"] + (
        ". Streams the input in shards of --shard_size rows over every local device (and every process "
        "with --coordinator_address), writing each shard's files and OUT/shards/<i>.json as it finishes; "
        "a rerun of the same command skips finished shards. Process 0 writes OUT/manifest.json (model "
        "config, checkpoint step, featurizer settings, shards, rejects) last; read back with "
        "chmr_jax.load_embeddings(OUT)."))
    parser.add_argument("--pretrained", required=True, help="a `chmr-jax pretrain` or `chmr-jax convert` workdir")
    parser.add_argument("--input", required=True,
                        help="molecules: .csv[.gz] with a SMILES column, .smi[.gz] or .parquet (local or gs://)")
    parser.add_argument("--out", required=True, help="output directory (or a gs:// folder: written in a per-job folder under "
                        "$CHMR_MIRROR_DIR/.staged, each finished shard uploaded at once)")
    parser.add_argument("--smiles_column", default="smiles")
    parser.add_argument("--id_column", help="CSV column with molecule ids (default: row numbers)")
    parser.add_argument("--formats", default="numpy,parquet,tfds",
                        help="comma list of numpy (alias npz), parquet, tfds")
    parser.add_argument("--batch_size", type=int, default=256, help="molecules per step over all local devices")
    parser.add_argument("--shard_size", type=int, default=10_000, help="input rows per output shard")
    parser.add_argument("--workers", type=int, help="featurization processes (default: the CPU count)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--cache_dir", help="unused (streamed input is featurized afresh); kept for old scripts")
    parser.add_argument("--no_progress", action="store_true", help="no progress line")
    parser.add_argument("--coordinator_address", default="", help="multi-process: HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, default=0, help="multi-process: number of processes")
    parser.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's index")
    args = parser.parse_args(argv)
    # Ctrl-C: a SIGINT that lands while Python runs a callback (e.g. jax's gc hook during its import) is
    # swallowed there ("Exception ignored in ..."), so it is also recorded and the export stops before its
    # next shard; either way one line, exit 130, and the rerun resumes.
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    def interrupted_line() -> int:
        print(f"chmr-jax embed: interrupted; finished shards are kept in {args.out}: run the same command "
              "again to resume (only the missing shards are embedded)", file=sys.stderr)
        return 130

    import signal
    # A process started with SIGINT ignored (nohup, a background job of a script) keeps ignoring it, as
    # Python itself does: no KeyboardInterrupt there.
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        if args.coordinator_address:
            import jax
            jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes; no-op elsewhere
            jax.distributed.initialize(args.coordinator_address, args.num_processes or None,
                                       None if args.process_id < 0 else args.process_id)
        from chmr_jax import config_util
        from chmr_jax.downstream import export, finetune

        def run():
            finetune.check_pretrained_step(args.pretrained, args.step, flag="--step")
            return export.export(
                export.load_encoder(args.pretrained, args.step), args.input, args.out,
                config_util.parse_list(args.formats), args.smiles_column, args.id_column,
                args.batch_size, None, shard_size=args.shard_size, n_workers=args.workers,
                show_progress=not args.no_progress, stop=lambda: bool(interrupted))
        code = _report_errors("embed", run)
    except KeyboardInterrupt:   # finished shards are on disk with their records: the same command resumes
        return interrupted_line()
    finally:
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)
    return interrupted_line() if interrupted else code


def _convert(argv: list[str]) -> int:
    parser = _Parser(prog="chmr-jax convert", description=COMMANDS["convert"] + (
        ". The .pt file is read without torch (torch's zip format); the output workdir works with "
        "embed, finetune and benchmark (--pretrained OUT)."))
    parser.add_argument("--torch", required=True, help="the release's checkpoint (torch.save of the GNN state_dict)")
    parser.add_argument("--out", required=True, help="new chmr_jax workdir")
    parser.add_argument("--config", help="base chmr_jax config file[:variant] (default configs/paper.py)")
    parser.add_argument("--drop_geometry", action="store_true",
                        help="leave out the 3D projector (anchor = fingerprint + graph), so the encoder needs "
                             "SMILES only; the release's 3D input is an external matrix")
    parser.add_argument("--morgan_radius", type=int, default=4,
                        help="Morgan radius of the 1D input the checkpoint was trained with (release: 4)")
    args = parser.parse_args(argv)
    from chmr_jax import config_util
    from chmr_jax.downstream import convert
    return _report_errors("convert", lambda: convert.convert(
        args.torch, args.out, config_util.load_config(args.config) if args.config else None, args.drop_geometry,
        args.morgan_radius), (FileNotFoundError, ValueError, KeyError))


def _report(argv: list[str]) -> int:
    parser = _Parser(prog="chmr-jax report", description=COMMANDS["report"] + (
        ". Writes loss_curves.png, code_usage.png, embedding_map.png (and enrichment_<benchmark>.png) with "
        "report.json into --out (default PRETRAINED/report)."))
    parser.add_argument("--pretrained", required=True, help="a `chmr-jax pretrain` workdir")
    parser.add_argument("--out", help="output directory, local or gs:// (default: PRETRAINED/report)")
    parser.add_argument("--benchmark", help="also plot which tree branches are enriched for each task's positives")
    parser.add_argument("--method", choices=["pca", "tsne"], default="pca", help="2-D map (t-SNE is slower)")
    parser.add_argument("--max_molecules", type=int, default=2000, help="corpus molecules to embed for the maps")
    parser.add_argument("--data_dir")
    parser.add_argument("--cache_dir")
    args = parser.parse_args(argv)
    from chmr_jax.data import corpus, registry
    from chmr_jax.downstream import report
    return _report_errors("report", lambda: report.run(args.pretrained, args.out, args.benchmark, args.method,
                                                       args.max_molecules, args.data_dir, args.cache_dir),
                          (FileNotFoundError, ValueError, corpus.CorpusError, registry.DataNotFoundError))


COMPILE_USAGE = """chmr-jax compile --config configs/pretrain.py[:variant] --topology NAME [--out FILE.json] [--fit] [--inputs] [--molecules N] [--config.a.b=value ...]

Compiles the pretraining step as `chmr-jax pretrain` would run it on a TPU topology (same mesh, padding
budget for that chip count, the config's dtype / remat / InfoNCE), on this machine, without a TPU
(needs libtpu: pip install 'jax[tpu]'). The first line says which molecules the shapes come from (the
config's corpus, or a STAND-IN). Prints one row and writes JSON: the compiler's peak memory per chip
against the HBM it allows, FLOPs, bytes and chip-to-chip (ICI) bytes per chip, and ESTIMATED step
times: XLA:TPU's own cycle estimate (the headline) beside the HBM-only and all-memory rooflines and the
ICI time, molecules/s and MFU. Nothing runs on a TPU.
NAME: v5e-16 / v5litepod-16, v6e-64 (chips), v4-32, v5p-128 (TensorCores, two per chip), or libtpu's
v5e:4x4, v4:2x2x4. --fit searches the largest global batch that fits HBM: each probe compiles in a
subprocess capped at --probe_memory_gib of this machine's memory, is logged as it finishes (--fit_log)
and is reused when the command runs again; the answer is a bracket until the compiler refuses a batch.
--molecules N sets the corpus size (the step's context arrays); --inputs also compiles the input build's
device programs at N (kNN, propagation per chunk width, held-out views: aot/inputs.py) and writes
"input_programs": [{name, per_chip_bytes, fits, calls, est_s_per_call, ...}]."""


def _compile(argv: list[str]) -> int:
    def more(flags, fv):
        flags.DEFINE_string("topology", None, "TPU topology: v5e-16, v5litepod-16, v4-32, v5p-128, v6e-64, v5e:4x4",
                            flag_values=fv)
        flags.DEFINE_string("out", None, "write the row(s) as JSON here (rewritten after each --fit probe)",
                            flag_values=fv)
        flags.DEFINE_boolean("fit", False, "also search the largest global batch that fits the chip's HBM",
                             flag_values=fv)
        flags.DEFINE_integer("max_probes", 8, "--fit: compiles after the config's batch", flag_values=fv)
        flags.DEFINE_float("probe_memory_gib", 5.0, "--fit: stop a probe's compile past this much host memory",
                           flag_values=fv)
        flags.DEFINE_float("probe_timeout_s", 1800, "--fit: stop a probe's compile after this long", flag_values=fv)
        flags.DEFINE_string("fit_log", None, "--fit: JSONL of the probes, appended as each finishes and resumed "
                            "(default: OUT.fit.jsonl, else ./chmr-fit-TOPOLOGY.jsonl)", flag_values=fv)
        flags.DEFINE_integer("molecules", 0, "corpus size N: the step's context arrays are scaled to it (the target "
                             "tables split by rows over the chips, the graph's indices replicated) and --inputs "
                             "compiles the input build for it (default: the config's corpus, or 129,592 for a "
                             "stand-in)", flag_values=fv)
        flags.DEFINE_boolean("inputs", False, "also compile the input build's device programs at N molecules (the "
                             "kNN, propagation and held-out views of pretrain_data.prepare) and write them as "
                             "input_programs", flag_values=fv)
        flags.DEFINE_integer("sample", 1024, "molecules the shapes are taken from", flag_values=fv)
        flags.DEFINE_string("hlo_dump", None, "write the compiled TPU program's HLO text here (and its proto to HLO_DUMP.pb)",
                             flag_values=fv)

    fv = _config_flags(argv, "compile", "pretrain.py", COMPILE_USAGE, more, required=("topology",), workdir=False)
    if isinstance(fv, int):
        return fv
    if fv["molecules"].present and fv.molecules < (2 if fv.inputs else 1):
        print(f"chmr-jax compile: --molecules must be at least {2 if fv.inputs else 1}"
              f"{' with --inputs (the kNN needs 2)' if fv.inputs else ''}, got {fv.molecules}", file=sys.stderr)
        return 2
    from chmr_jax.training import aot
    spec = aot.parse_topology(fv.topology)
    # Before any JAX backend starts: JAX itself runs on this machine's CPU, libtpu only describes the
    # topology and compiles for it (no TPU is claimed; no metadata server is asked for one).
    aot.quiet_libtpu(spec)
    import jax
    jax.config.update("jax_platforms", "cpu")
    import json

    from chmr_jax.data import files, paths
    config = fv.config
    if fv.data_dir:
        config.data_dir = fv.data_dir
    out = {}

    def write():
        if fv.out:
            files.atomic_write_text(fv.out, json.dumps(out, indent=1, default=str))   # (local or gs://)

    try:
        if fv.hlo_dump:   # checked before the long compile: a text file written locally
            paths.local_only(fv.hlo_dump, "--hlo_dump", "the HLO text is written as a local file")
        if fv.out:        # (a gs:// --out is written as an object; its bucket is asked now, not after compiling)
            paths.check_reachable(fv.out, "--out")
        # The sample first: a featurization pool's workers must not start while libtpu holds its lock.
        sample = aot.load_sample(config, spec.chips, fv.sample, fv.molecules or None)
        print(f"shapes from: {sample.shapes_from}; context arrays for {sample.molecules:,} molecules", flush=True)
        devices = aot.tpu_devices(spec)
        print(f"compiling for {spec.topology_name}: {spec.chips} x {devices[0].device_kind} chips, {spec.hosts} "
              f"host(s); everything below is an estimate from the compiled program, nothing runs on a TPU",
              flush=True)
        print(f"programs: the pretraining step{' and the input build (kNN, propagation, held-out views)' if fv.inputs else ''}"
              f" at N = {sample.molecules:,} molecules", flush=True)
        row = aot.compile_step(config, spec, None, sample, devices, hlo_dump=fv.hlo_dump)
        print(aot.format_rows([row]), flush=True)
        for line in aot.warnings(row):
            print(line, flush=True)
        out.update(row, fit=None)
        write()
        if fv.inputs:
            from chmr_jax.training.aot import inputs as inputs_lib
            programs = inputs_lib.compile_inputs(config, spec, sample, devices, sample.molecules,
                                                 log=lambda line: print(line, flush=True))
            out["input_programs"] = programs
            out["input_build_est_s"] = inputs_lib.total_est_s(programs)
            write()
            print(inputs_lib.text(programs, sample.molecules), flush=True)
        if fv.fit and not row.get("host_calls"):
            log_path = fv.fit_log or (f"{fv.out}.fit.jsonl" if fv.out and not paths.is_remote(fv.out)
                                      else f"chmr-fit-{spec.topology_name.replace(':', '-')}.jsonl")
            print(f"--fit: each probe compiles in a subprocess capped at {fv.probe_memory_gib:g} GiB; probes are "
                  f"logged to {log_path} as they finish (rerun to resume)", flush=True)
            fit = aot.largest_batch(config, spec, sample, devices, row, fv.max_probes, log_path,
                                    int(fv.probe_memory_gib * aot.GiB), fv.probe_timeout_s,
                                    on_probe=lambda rec: (out.update(fit_probes_so_far=out.get("fit_probes_so_far", [])
                                                                     + [{k: v for k, v in rec.items() if k != "row"}]),
                                                          write()))
            out.pop("fit_probes_so_far", None)
            out["fit"] = fit
            write()
            print(aot.bracket_text(fit, spec.chip.hbm_text()), flush=True)
    except aot.CompileError as e:
        print(f"chmr-jax compile: {e}", file=sys.stderr)
        return 2
    if row.get("host_calls"):
        print(f"chmr-jax compile: the TPU program calls back to the host ({', '.join(row['host_calls'])}): "
              "it would stall every step on a TPU", file=sys.stderr)
        return 2
    if fv.out:
        print(f"written to {fv.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        # Asked for: stdout, exit 0. No command given: the same list on stderr, exit 2 (a usage error).
        text = "usage: chmr-jax <command> [flags]   (chmr-jax <command> --help lists its flags; chmr-jax --version)\n\n" \
            + "commands:\n" + "\n".join(f"  {name:10s} {desc}" for name, desc in COMMANDS.items())
        print(text, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        from chmr_jax import __version__
        print(f"chmr-jax {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    handlers = {"prepare": _prepare, "pretrain": _pretrain, "finetune": _finetune, "benchmark": _benchmark,
                "stress": _stress, "embed": _embed, "convert": _convert, "report": _report,
                "compile": _compile}
    if command in handlers:
        try:
            return handlers[command](rest)
        except Exception as e:   # expected: one line naming the file / row / flag (exit 2) or the fault (3)
            if exit_code_of(e) is None:
                raise
            return _user_error(command, e)
    print(f"chmr-jax: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
