"""Command line: `edgelb run|check|schema|demo|manifests`, `--version`."""

from __future__ import annotations

import argparse

from edgelb import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelb",
        description="Edge reverse-proxy load balancer: static ports, hot-swapped pools, "
        "least-loaded balancing, Prometheus metrics.",
    )
    p.add_argument("--version", action="version", version=f"edgelb {__version__}")
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity (default: $EDGELB_LOG_LEVEL, else info)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the proxy with a config file (SIGHUP or a file change reloads it)"
    )
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                     help="data-plane worker processes (default: the config's workers:, else "
                     "1); auto: one per usable core (the container's CPU quota)")
    _log_format(run)

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of the config file (for editor completion)"
    )
    schema.add_argument(
        "--markdown",
        action="store_true",
        help="print the table of per-service keys (as in README.md) instead",
    )

    demo = sub.add_parser(
        "demo", help="start three local demo backends and the proxy in front of them"
    )
    demo.add_argument(
        "--port", type=int, default=8080, help="proxy port on 127.0.0.1 (default 8080)"
    )
    demo.add_argument(
        "--admin-port", type=int, default=9090, help="admin port on 127.0.0.1 (default 9090)"
    )
    demo.add_argument(
        "--marathon", action="store_true",
        help="run the backends as the tasks of apps on a fake Marathon, followed by the "
        "Marathon watcher (--port is then the http entrypoint)",
    )
    demo.add_argument(
        "--marathon-port", type=int, default=8180,
        help="the fake Marathon's port on 127.0.0.1 (default 8180)",
    )
    _log_format(demo)
    manifests = sub.add_parser(
        "manifests", help="print Kubernetes YAML to run edgelb as an ingress pod"
    )
    from edgelb.ops.manifests import add_arguments

    add_arguments(manifests)
    return p


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"expected a count from 1 to 256 or auto, got {value!r}")
    return n


def _log_format(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--log-format", choices=["text", "json"], default=None,
                     help="the process log on stderr: text, or one JSON object per line "
                     "(default: $EDGELB_LOG_FORMAT, else text)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from edgelb.ops.logfmt import configure

    configure(args.log_level, getattr(args, "log_format", None))
    if args.command == "run":
        from edgelb.ops.app import run_forever

        log_args: tuple[str, ...] = ()
        if args.log_level:
            log_args += ("--log-level", args.log_level)
        if args.log_format:
            log_args += ("--log-format", args.log_format)
        return run_forever(args.config, workers=args.workers, log_args=log_args)
    if args.command == "check":
        from edgelb.ops.config import check_command

        return check_command(args.config)
    if args.command == "schema":
        from edgelb.ops.config import schema_command

        return schema_command(markdown=args.markdown)
    if args.command == "demo":
        if args.marathon:
            from edgelb.ops.demo import main_marathon

            return main_marathon(port=args.port, admin_port=args.admin_port,
                                 marathon_port=args.marathon_port)
        from edgelb.ops.demo import main as demo_main

        return demo_main(port=args.port, admin_port=args.admin_port)
    if args.command == "manifests":
        from edgelb.ops.manifests import command

        return command(args)
    parser.print_help()
    return 2
