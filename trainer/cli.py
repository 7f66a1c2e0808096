"""Command line: `python -m trainer {train,eval,predict,neighbors,data,report,precompile}`.

User errors (bad config, bad data, bad vector files, a run folder that cannot be resumed) print one line naming
the file, line or flag, and exit 2; no traceback. Everything else is a bug and keeps its traceback.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

USAGE = """python -m trainer COMMAND ...

commands:
  train      --config FILE [--section.field VALUE ...]   train (also under torchrun); --help-config lists every field
  eval       --run RUN_DIR --data PATH [--no-extend]     accuracy / macro F1 as JSON on stdout
  predict    --run RUN_DIR [--top-k K] [--input FILE] [--no-extend]
                                                         one JSON object per input line
  neighbors  --run RUN_DIR WORD [--k 10]                 nearest words by cosine
  data       debian --out DIR                            build the demo dataset from the apt lists
  report     --run RUN_DIR [--json] [--no-plots]         summary of a run: metrics, throughput, time split, plots
  precompile [--no-distributed] [--strict]               compile the numba kernels into their cache (image build)
"""


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if "RANK" not in os.environ else f"[rank {rank}] "
    logging.basicConfig(level=level, stream=sys.stderr, format=f"%(asctime)s {prefix}%(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # huggingface_hub prints through a handler of its own: passed on to the root handler too, every line came twice
    logging.getLogger("huggingface_hub").propagate = False


_USER_ERRORS = {"trainer.checkpoint": "ResumeError", "trainer.config": "ConfigError",
                "trainer.debian": "DebianListsMissing", "trainer.export": "ModelFolderError",
                "trainer.tabular": "DataError",
                "trainer.run_control": "TrainingStopped", "trainer.vectors_text": "VectorFileError"}


def _user_errors() -> tuple[type[BaseException], ...]:
    # An exception's class is defined in a module that is already imported: take the classes from sys.modules
    # rather than importing torch (seconds) just to print a one-line config error.
    found = tuple(getattr(sys.modules[m], name) for m, name in _USER_ERRORS.items() if m in sys.modules)
    return (*found, FileNotFoundError, KeyError)


def cmd_train(argv: list[str]) -> int:
    from trainer.config import describe_fields, load_config

    if "--help-config" in argv or "-h" in argv or "--help" in argv:
        print("python -m trainer train --config FILE [--section.field VALUE ...] [--check-config]\n")
        print("--check-config: check the settings, the data paths and the output folders, then exit (0, or 2 with "
              "the error) without importing torch or training; the launch scripts run it before torchrun so that "
              "a mistake is one line, not one per rank with torchrun's traceback\n")
        print(describe_fields())
        return 0
    check_only = "--check-config" in argv
    argv = [a for a in argv if a != "--check-config"]
    config_path = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" or argv[i].startswith("--config="):
            from trainer.config import ConfigError

            if argv[i] == "--config" and i + 1 >= len(argv):
                raise ConfigError("--config: missing file name")
            given = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
            if config_path is not None:  # one file: the second one silently replaced the first
                raise ConfigError(f"--config given twice ({config_path}, {given}); pass one file")
            config_path = given
            i += 1 if "=" in argv[i] else 2
        else:
            rest.append(argv[i])
            i += 1
    cfg = load_config(config_path, rest)
    if not cfg.data.train:
        from trainer.config import ConfigError

        raise ConfigError("data.train: no training data given (set it in the config or pass --data.train PATH)")
    from trainer.background_build import start_background_build
    from trainer.config import check_output_folders

    check_output_folders(cfg)
    if check_only:
        from trainer.tabular import check_data_path  # not data_cache: its numba import is 0.2 s more

        # only global rank 0 reads the data files (the other ranks map its cache): nodes other than 0 need no copy
        node = os.environ.get("PET_NODE_RANK") or os.environ.get("NODE_RANK") or "0"
        for role in ("train", "valid", "test") if node == "0" else ():
            if getattr(cfg.data, role):
                check_data_path(getattr(cfg.data, role), f"data.{role}")
        vectors = cfg.embeddings.pretrained
        if vectors and vectors.strip().lower() != "glove-6b-50d" and not Path(vectors).expanduser().is_file():
            from trainer.config import ConfigError

            raise ConfigError(f"embeddings.pretrained: {vectors}: no such file")
        sys.stderr.write("config OK\n")
        return 0

    # a missing data cache is built by a child process while this one imports torch (data.build_in_background)
    background_build = start_background_build(cfg)
    try:
        # torch: imported once the configuration is known to be valid
        from trainer.trainer import run_training

        result = run_training(cfg, background_build)
    finally:
        if background_build is not None:  # training failed before waiting for it
            background_build.cancel()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    # stopped by a signal this process received, after its checkpoint: the status a shell gives a process that
    # signal ended (143 for SIGTERM), so that `train && next` does not go on with an unfinished run. A rank that
    # stopped because another was signalled exits 0 (trainer._steps). The JSON says {"stopped": true}
    return 128 + int(result["signal"]) if result.get("stopped") and result.get("signal") else 0


def _check_device(device: str) -> None:
    import re

    from trainer.config import ConfigError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):  # torch's own message for "gpu" was a traceback
        raise ConfigError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch.cuda.is_available() is false (no GPU, or a CPU build of "
                              "torch); use --device cpu")


def cmd_eval(argv: list[str]) -> int:
    from trainer.inference import run_eval

    p = argparse.ArgumentParser(prog="python -m trainer eval")
    p.add_argument("--run", required=True, help="run folder (or its model/ folder)")
    p.add_argument("--data", required=True, help="labelled data: .csv/.tsv/.jsonl/.json/.parquet path (also compressed), or hub name[:split] (default split: test)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-extend", action="store_true", help="score with the training vocabulary only (the result the run reported for its test data); by default words unseen in training get their pretrained rows")
    p.add_argument("--data.text_column", dest="text_column", help="the text column of --data (default: the run's)")
    p.add_argument("--data.label_column", dest="label_column", help="the label column of --data (default: the run's)")
    args = p.parse_args(argv)
    _check_device(args.device)
    summary, table = run_eval(args.run, args.data, args.device, extend=not args.no_extend,
                              text_column=args.text_column, label_column=args.label_column)
    sys.stderr.write(table + "\n")
    print(json.dumps(summary))
    return 0


def cmd_predict(argv: list[str]) -> int:
    from trainer.inference import Predictor, interactive_fd, print_jsonl

    p = argparse.ArgumentParser(prog="python -m trainer predict")
    p.add_argument("--run", required=True, help="run folder (or its model/ folder)")
    p.add_argument("--top-k", type=int, default=1, help="labels per text, most probable first (default: 1)")
    p.add_argument("--input", default="-", help="file with one text per line (default: stdin)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-extend", action="store_true", help="predict with the training vocabulary only; by default words unseen in training get their pretrained rows")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.input != "-" and not os.path.exists(args.input):  # pipes and /dev/stdin too
        p.error(f"--input: no such file: {args.input}")
    if args.input != "-" and os.path.isdir(args.input):
        p.error(f"--input: {args.input} is a folder; give a file with one text per line")
    _check_device(args.device)
    predictor = Predictor(args.run, args.device, extend=not args.no_extend)
    if args.input == "-":
        print_jsonl(predictor.predict_stream(sys.stdin, args.top_k), flush=interactive_fd(sys.stdin) is not None)
    else:
        with open(args.input, encoding="utf-8", errors="replace") as f:
            print_jsonl(predictor.predict_stream(f, args.top_k), flush=interactive_fd(f) is not None)
    return 0


def cmd_neighbors(argv: list[str]) -> int:
    from trainer.inference import neighbors, print_jsonl

    p = argparse.ArgumentParser(prog="python -m trainer neighbors")
    p.add_argument("--run", required=True, help="run folder (or its model/ folder)")
    p.add_argument("word", help="one word: its nearest words by cosine similarity of the model's embeddings")
    p.add_argument("--k", type=int, default=10, help="how many neighbours (default: 10)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    if len(args.word.split()) != 1:
        p.error(f"expected one word, got {args.word!r}")
    print_jsonl(neighbors(args.run, args.word, args.k))
    return 0


def cmd_data(argv: list[str]) -> int:
    if not argv or argv[0] != "debian":
        sys.stderr.write("usage: python -m trainer data debian --out DIR\n")
        return 2
    from trainer.debian import main as debian_main

    return debian_main(argv[1:], prog="python -m trainer data debian")


def cmd_report(argv: list[str]) -> int:
    from trainer.report import main as report_main

    return report_main(argv)


def cmd_precompile(argv: list[str]) -> int:
    from trainer.precompile import main as precompile_main

    return precompile_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "neighbors": cmd_neighbors,
            "data": cmd_data, "report": cmd_report, "precompile": cmd_precompile}


def _bounded_openmp_spinning() -> None:
    """Idle OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT=100000), unless the user chose a policy.

    Why: torch's and numba's OpenMP pools spin after every parallel region. Spinning is fastest on dedicated cores
    and disastrous on shared ones (other jobs, a Kubernetes CPU limit): spinning threads steal the cores the working
    ones need. Measured on the 2-core dev VM, bag encoder, batch 1024, 2 threads (tokens/s, quiet / with two busy
    loops beside it): spin without limit 17.5M / 2.1M; sleep at once (OMP_WAIT_POLICY=PASSIVE) 13.5M / 7.7M;
    spin up to 100000 iterations 16.7M / 5.1M. Set OMP_WAIT_POLICY=PASSIVE on heavily shared machines, ACTIVE on
    dedicated ones. It must be set before the OpenMP runtime loads, i.e. before torch is imported, which this module
    never does at import time.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "100000"


def main(argv: list[str] | None = None) -> int:
    _bounded_openmp_spinning()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        (sys.stdout if asked else sys.stderr).write(USAGE)  # asked for: on stdout, so `| less` shows it
        if argv and not asked:
            import difflib

            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            sys.stderr.write(f"error: unknown command {argv[0]!r}"
                             + (f"; did you mean {close[0]!r}?" if close else "") + "\n")
        return 0 if asked else 2
    _setup_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _user_errors() as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        sys.stderr.write(f"error: {message}\n")
        return 2


def _lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another rank's process ended: gloo's "Connection closed by peer" /
    "Connection reset by peer", in a process that joined a group."""
    if not getattr(sys.modules.get("trainer.distributed"), "_joined_process_group", False):
        return False
    text = str(e)
    return isinstance(e, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


def run() -> None:
    """`python -m trainer` and the `trainer` console script: main(), then `process_exit.end_process` (a process
    that joined a gloo group must not finalise the interpreter; see there), also when main() raised: the exit
    status Python would have given (SystemExit's code; 1 with the traceback printed for anything else)."""
    from trainer.process_exit import end_process

    try:
        code = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code
        else:  # SystemExit("message"): Python prints it and exits 1
            sys.stderr.write(f"{e.code}\n")
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130  # what a shell reports for a process ended by SIGINT
    except BrokenPipeError:  # stdout's reader left (`trainer report | head`): nothing more to say, and no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        code = 141  # what a shell reports for a process ended by SIGPIPE
    except BaseException as e:  # noqa: BLE001 - reported as Python would, then the same exit path
        forced = getattr(sys.modules.get("trainer.process_exit"), "forced_exit", None)
        if forced is not None:  # a second SIGINT / SIGTERM's SystemExit, wrapped on its way (e.g. by a DCP save)
            code = forced
        elif _lost_a_peer(e):
            # another rank ended (its own error, with its message, is in the log): one line here, not gloo's
            # 70-line traceback on every other rank, which buried that message
            sys.stderr.write(f"error: rank {os.environ.get('RANK', '?')}: another rank ended, so this one stops "
                             f"({str(e).splitlines()[0][:200]})\n")
            code = 1
        else:
            traceback.print_exc()
            code = 1
    # joined a process group: known to trainer.distributed, if this command imported it (torch) at all
    end_process(code, getattr(sys.modules.get("trainer.distributed"), "_joined_process_group", False))
