"""Shared test helper: run the `ldm-rt` CLI in-process (tests/ is on sys.path under pytest)."""

from click.testing import CliRunner

from ldm_rt.cli import main


def invoke(*args):
    """`ldm-rt ARGS`; a user error exits with its message, anything else is a bug and is raised."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not a user error: show it
    return result
