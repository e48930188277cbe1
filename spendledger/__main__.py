"""`spendledger` and `python -m spendledger`: the CLI, or what to install where only the client is."""

import sys


def main() -> int:
    try:
        from spendledger.cli import main as run
    except ModuleNotFoundError as exc:  # `pip install spendledger` is the client alone (docs/sdk.md)
        print(
            f"error: the ledger's server is not installed here ({exc.name} is missing): "
            "pip install 'spendledger[embedded]' for `spendledger up`, or 'spendledger[server]'",
            file=sys.stderr,
        )
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
