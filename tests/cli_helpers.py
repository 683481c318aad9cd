"""Run the synthgen CLI in-process in tests, failing on a non-zero exit."""

from synthgen.cli import main


def run_cli(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), e
