"""python -m devstack up [--detach] | down | status"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from devstack.demo import run_demos
from devstack.launcher import DevstackSettings, StackError, start_stack, status, stop_stack


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the dev stack (foreground until Ctrl-C, or --detach)")
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    up.add_argument("--no-demo", action="store_true", help="do not send the demo deliveries")
    for name in DevstackSettings.model_fields:
        if name.endswith("_port"):
            up.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    sub.add_parser("down", help="stop the processes recorded in .devstack/stack.json")
    sub.add_parser("status", help="show what runs and where")
    args = parser.parse_args()

    cfg = DevstackSettings(**{k: v for k, v in vars(args).items() if k.endswith("_port") and v is not None})
    if args.command == "down":
        stop_stack(cfg)
        return 0
    if args.command == "status":
        return status(cfg)

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background by a non-interactive shell, SIGINT comes in ignored; Ctrl-C (or
        # `kill -INT`) must still stop the stack cleanly, so take it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"starting the dev stack (logs in {cfg.log_dir})", flush=True)
    try:
        state = start_stack(cfg)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        print("ready.", flush=True)
        if not args.no_demo:
            asyncio.run(run_demos(state))
        print("\nOpen:")
        for name, url in state["urls"].items():
            print(f"  {name:<9} {url}")
        if "codec" in state["urls"]:
            token = ("$OUTBOUND_CODEC_SERVER_TOKEN" if os.environ.get("OUTBOUND_CODEC_SERVER_TOKEN")
                     else f"$(cat {cfg.codec_token_file})")
            print(f"\nPayloads are encrypted. Read them with the codec server, e.g.\n"
                  f"  .venv/bin/temporal workflow show --address {state['urls']['temporal']} -w ID --detailed "
                  f"--codec-endpoint {state['urls']['codec']} --codec-auth \"Bearer {token}\"")
        else:
            print("\nPayloads are PLAIN (not encrypted): set OUTBOUND_CODEC_KEYS to encrypt them (README, Security).")
        print("\nTry:  .venv/bin/python starter.py send --tenant acme --channel email --to you@example.org "
              "--subject Hello --body 'Hi there' --wait")
        if args.detach:
            print("detached: stop it with `python -m devstack down`")
            return 0
        print("serving; Ctrl-C stops everything", flush=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        try:
            stopped.wait()
        except KeyboardInterrupt:
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if not args.detach:
            print("\nstopping the dev stack", flush=True)
            stop_stack(cfg)
    return 0


if __name__ == "__main__":
    code = main()
    # Exit without interpreter teardown: the Temporal client's native threads can abort it
    # ("PyGILState_Release", temporalio/sdk-python#300) and turn a clean exit into 134.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
